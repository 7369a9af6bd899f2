"""``merv serve``: an OpenAI-compatible chat-completions server for a trained merv checkpoint, with a chat page.

Modules: :mod:`settings` (the typed options), :mod:`protocol` (request and response shapes), :mod:`media` (video and
frames from URLs), :mod:`engine` (the batching generation worker), :mod:`app` (the FastAPI routes and ``serve``).
"""
