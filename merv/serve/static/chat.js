// The chat page of `merv serve`: choose or upload a video, then ask about it. Answers stream from the server's
// OpenAI-compatible /v1/chat/completions (text/event-stream); the whole conversation is sent with each question,
// the video as a video_url part of the first user message.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { model: null, video: null, messages: [], busy: false };
window.chat = chat; // inspectable (tests, the browser console)

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
  $("player").src = `/api/media?url=${encodeURIComponent(video.url)}`;
  $("video-info").textContent = `${video.name} (${(video.bytes / 1024).toFixed(0)} KiB)`;
}

async function loadVideos() {
  const response = await fetch("/api/videos");
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
  const response = await fetch("/api/uploads", { method: "POST", body: form });
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
    const response = await fetch("/v1/chat/completions", {
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
  if (event.target.files.length) upload(event.target.files[0]);
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
loadVideos().catch((error) => setStatus(`cannot list videos: ${error.message}`));
