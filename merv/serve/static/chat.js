// The chat page of `merv serve`: choose or upload a video, then ask about it. Answers stream from the server's
// OpenAI-compatible /v1/chat/completions (text/event-stream); the whole conversation is sent with each question,
// the video as a video_url part of the first user message. A server started with an API key answers 401: the page
// then asks for the key, keeps it for this tab only (sessionStorage) and sends it as a Bearer token; the <video>
// gets its file as a blob, since a media element cannot send headers.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { model: null, video: null, messages: [], busy: false, apiKey: sessionStorage.getItem("merv-api-key") };
window.chat = chat; // inspectable (tests, the browser console)

class KeyNeeded extends Error {}

// fetch() with the API key (when there is one); a 401 shows the key form.
async function api(url, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (chat.apiKey) headers.Authorization = `Bearer ${chat.apiKey}`;
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new KeyNeeded(chat.apiKey ? "the API key was refused: enter it again" : "enter the server's API key");
  }
  return response;
}

function setStatus(text) {
  $("status").textContent = text || "";
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function addVideoOption(video) {
  const option = document.createElement("option");
  option.value = video.url;
  option.textContent = video.name;
  option.dataset.video = JSON.stringify(video);
  $("video-select").appendChild(option);
  return option;
}

function chooseVideo(video) {
  chat.video = video;
  chat.messages = [];
  $("messages").replaceChildren();
  setStatus("");
  if (!video) {
    $("player").removeAttribute("src");
    $("video-info").textContent = "";
    return;
  }
  const media = `/api/media?url=${encodeURIComponent(video.url)}`;
  if (chat.apiKey) {
    api(media)
      .then((response) => response.blob())
      .then((blob) => {
        if (chat.video === video) $("player").src = URL.createObjectURL(blob);
      })
      .catch((error) => setStatus(error.message));
  } else {
    $("player").src = media;
  }
  $("video-info").textContent = `${video.name} (${(video.bytes / 1024).toFixed(0)} KiB)`;
}

async function loadVideos() {
  const response = await api("/api/videos");
  const listing = await response.json();
  chat.model = listing.model;
  chat.maxUploadBytes = listing.max_upload_bytes;
  $("model-name").textContent = listing.model;
  listing.videos.forEach(addVideoOption);
}

async function upload(file) {
  if (file.size > chat.maxUploadBytes) {
    setStatus(`${file.name} is larger than the server's upload limit`);
    return;
  }
  setStatus(`uploading ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  const response = await api("/api/uploads", { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) {
    setStatus(body.error ? body.error.message : `upload failed (HTTP ${response.status})`);
    return;
  }
  const option = addVideoOption(body);
  $("video-select").value = option.value;
  chooseVideo(body);
}

function userMessage(question) {
  if (chat.messages.length > 0) return { role: "user", content: question };
  return {
    role: "user",
    content: [
      { type: "video_url", video_url: { url: chat.video.url } },
      { type: "text", text: question },
    ],
  };
}

// Parse server-sent events from a fetch body; calls onDelta for each piece of answer text.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the answer stream ended early");
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) onDelta(delta);
      }
    }
  }
}

async function ask(question) {
  if (!chat.video) {
    setStatus("choose or upload a video first");
    return;
  }
  chat.busy = true;
  $("send").disabled = true;
  setStatus("");
  const message = userMessage(question);
  bubble("user", question);
  const answer = bubble("assistant", "");
  answer.dataset.done = "false";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: chat.model,
        messages: [...chat.messages, message],
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    await readStream(response, (delta) => {
      answer.textContent += delta;
      answer.scrollIntoView({ block: "end" });
    });
    chat.messages.push(message, { role: "assistant", content: answer.textContent });
  } catch (error) {
    answer.classList.add("error");
    answer.textContent = error.message;
    setStatus("the question failed; it is not kept in the conversation");
  } finally {
    answer.dataset.done = "true";
    chat.busy = false;
    $("send").disabled = false;
  }
}

$("video-select").addEventListener("change", (event) => {
  const option = event.target.selectedOptions[0];
  chooseVideo(option && option.dataset.video ? JSON.parse(option.dataset.video) : null);
});
$("video-upload").addEventListener("change", (event) => {
  if (event.target.files.length) upload(event.target.files[0]).catch((error) => setStatus(error.message));
});
$("reset").addEventListener("click", () => chooseVideo(chat.video));
$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || chat.busy) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  chat.apiKey = $("api-key").value.trim();
  sessionStorage.setItem("merv-api-key", chat.apiKey);
  $("api-key").value = "";
  $("key-form").hidden = true;
  setStatus("");
  $("video-select").replaceChildren($("video-select").options[0]);
  start();
});

function start() {
  loadVideos().catch((error) =>
    setStatus(error instanceof KeyNeeded ? error.message : `cannot list videos: ${error.message}`),
  );
}
start();
