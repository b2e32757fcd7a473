// The LMFusion page: a client of the server's OpenAI-compatible API, nothing more.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("lmfusion-api-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("lmfusion-api-key", keyInput.value); loadModel(); });
let modelId = "lmfusion";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

// The server answers errors as {"error": {"message": ...}}; show that message, not a status code.
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
  if (response.status === 401) message += " (enter the server's API key at the top right)";
  return new Error(message);
}

async function api(path, body) {
  const response = await fetch(path, { method: body ? "POST" : "GET", headers: headers(), body: body && JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Runs `work` with the section's progress line (elapsed seconds) and its error box.
async function busy(name, button, work) {
  const status = $(name + "-status"), error = $(name + "-error");
  const started = performance.now();
  const tick = () => { status.querySelector("span").textContent = `working… ${((performance.now() - started) / 1000).toFixed(1)} s`; };
  tick();
  const timer = setInterval(tick, 100);
  status.hidden = false; error.hidden = true; button.disabled = true;
  try {
    await work();
  } catch (e) {
    error.textContent = e.message || String(e);
    error.hidden = false;
  } finally {
    clearInterval(timer); status.hidden = true; button.disabled = false;
  }
}

function numberOrUndefined(input) { return input.value === "" ? undefined : Number(input.value); }

// ------------------------------------------------------------------ tabs
document.querySelectorAll("nav button").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((t) => t.setAttribute("aria-selected", String(t === tab)));
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== tab.dataset.tab; });
}));

async function loadModel() {
  try {
    const [models, health] = await Promise.all([api("/v1/models"), fetch("/health").then((r) => r.json())]);
    modelId = models.data[0].id;
    $("model-info").textContent = `model ${modelId} · ${health.image_size}×${health.image_size} images · ${health.status}`;
  } catch (e) {
    $("model-info").textContent = e.message;
  }
}
loadModel();

// ------------------------------------------------------------------ draw
$("draw-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy("draw", $("draw-submit"), async () => {
    const body = {
      model: modelId, prompt: $("draw-prompt").value, n: numberOrUndefined($("draw-n")) || 1, response_format: "b64_json",
      steps: numberOrUndefined($("draw-steps")), guidance_scale: numberOrUndefined($("draw-guidance")), seed: numberOrUndefined($("draw-seed")),
    };
    const result = await api("/v1/images/generations", body);
    showImages($("draw-results"), result.data, body.prompt);
  });
});

// A gallery of returned images, each with its seed as a download link.
function showImages(gallery, items, alt) {
  gallery.replaceChildren(...items.map((item) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + item.b64_json;
    img.alt = alt;
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = img.src; link.download = `lmfusion-seed${item.seed}.png`; link.textContent = `seed ${item.seed}`;
    caption.append(link);
    figure.append(img, caption);
    return figure;
  }));
}

// ------------------------------------------------------------------ edit
// OpenAI's images.edit is a multipart form: the image as a file, the other fields as text.
$("edit-file").addEventListener("change", async (e) => {
  const file = e.target.files[0], preview = $("edit-preview");
  if (!file) return;
  preview.src = await readAsDataURL(file); preview.alt = file.name; preview.hidden = false;
});

$("edit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy("edit", $("edit-submit"), async () => {
    const form = new FormData();
    const file = $("edit-file").files[0];
    if (file) form.append("image", file, file.name);  // without one, the server says what is missing
    form.append("prompt", $("edit-prompt").value);
    form.append("model", modelId);
    form.append("n", String(numberOrUndefined($("edit-n")) || 1));
    for (const [field, id] of [["steps", "edit-steps"], ["guidance_scale", "edit-guidance"],
                               ["image_guidance_scale", "edit-image-guidance"], ["strength", "edit-strength"],
                               ["seed", "edit-seed"]]) {
      if ($(id).value !== "") form.append(field, $(id).value);
    }
    const h = headers();
    delete h["Content-Type"];  // the browser sets multipart/form-data with its boundary
    const response = await fetch("/v1/images/edits", { method: "POST", headers: h, body: form });
    if (!response.ok) throw await failure(response);
    showImages($("edit-results"), (await response.json()).data, $("edit-prompt").value);
  });
});

// ------------------------------------------------------------------ caption
const dropZone = $("drop-zone");
["dragenter", "dragover"].forEach((type) => dropZone.addEventListener(type, (e) => { e.preventDefault(); dropZone.classList.add("over"); }));
["dragleave", "drop"].forEach((type) => dropZone.addEventListener(type, () => dropZone.classList.remove("over")));
dropZone.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files[0]) captionFile(e.dataTransfer.files[0]); });
$("caption-file").addEventListener("change", (e) => { if (e.target.files[0]) captionFile(e.target.files[0]); });

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function captionFile(file) {
  busy("caption", $("caption-file"), async () => {
    $("caption-text").textContent = "";
    const url = await readAsDataURL(file);
    const preview = $("caption-preview");
    preview.src = url; preview.alt = file.name; preview.hidden = false;
    const result = await api("/v1/chat/completions", {
      model: modelId,
      messages: [{ role: "user", content: [{ type: "text", text: "Describe this image." }, { type: "image_url", image_url: { url } }] }],
    });
    $("caption-text").textContent = result.choices[0].message.content;
  });
}

// ------------------------------------------------------------------ chat
let history = [];

function addMessage(role, text, images) {
  const div = document.createElement("div");
  div.className = "message " + role;
  // "[image k]" marks where the k-th image of message.images was drawn.
  (text || "").split(/(\[image \d+\])/).forEach((piece) => {
    const match = piece.match(/^\[image (\d+)\]$/);
    const image = match && images && images[Number(match[1]) - 1];
    if (image) {
      const img = document.createElement("img");
      img.className = "chat-image"; img.src = image.image_url.url; img.alt = piece;
      div.append(document.createElement("br"), img, document.createElement("br"));
    } else {
      div.append(piece);
    }
  });
  $("chat-log").append(div);
  return div;
}

// Reads a server-sent-events body, calling onDelta with each content piece.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (line === "[DONE]") return;
      const event = JSON.parse(line);
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) onDelta(delta.content);
    }
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value;
  if (!text.trim()) return;
  busy("chat", $("chat-submit"), async () => {
    const draw = $("chat-draw").checked;
    const messages = [...history, { role: "user", content: text }];
    addMessage("user", text);
    $("chat-input").value = "";
    const body = { model: modelId, messages, modalities: draw ? ["text", "image"] : ["text"], stream: !draw };
    let reply;
    if (draw) {
      const message = (await api("/v1/chat/completions", body)).choices[0].message;
      addMessage("assistant", message.content, message.images);
      reply = message.content;
    } else {  // text streams in as it is written
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      if (!response.ok) throw await failure(response);
      const div = addMessage("assistant", "");
      reply = "";
      await readStream(response, (piece) => { reply += piece; div.textContent = reply; });
    }
    history = [...messages, { role: "assistant", content: reply }];
  });
});
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-clear").addEventListener("click", () => { history = []; $("chat-log").replaceChildren(); $("chat-error").hidden = true; });
