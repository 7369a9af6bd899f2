"""Result tables and figures across the configured models (the ``make_tables`` stage, ``merv report``)."""
