// The archive search page: fills the filters from /api/info, sends a query to /api/search, shows the hits as a
// grid. Every value from the index is shown as text (textContent), never as markup.
"use strict";

const element = (id) => document.getElementById(id);
let currentPage = 1;

function option(select, value) {
  const entry = document.createElement("option");
  entry.value = value;
  entry.textContent = value;
  select.appendChild(entry);
}

async function describeArchive() {
  const info = await (await fetch("api/info")).json();
  element("archive").textContent = `${info.rows.toLocaleString()} images`;
  element("deidentified").hidden = !info.deidentified;
  info.modalities.forEach((value) => option(element("modality"), value));
  info.experts.forEach((value) => option(element("expert"), value));
  info.groups.forEach((value) => option(element("group"), value));
  document.querySelectorAll("[data-filter]").forEach((label) => {
    const name = label.dataset.filter;
    label.hidden = name === "dates" ? !info.dates : name === "modality" ? !info.modalities.length
      : !info.filters.includes(name);
  });
}

function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function request(page) {
  const body = { page };
  const file = element("image").files[0];
  if (file) {
    body.image_base64 = await fileAsBase64(file);
    body.window = element("window").value.trim();
  } else {
    body.text = element("text").value.trim();
  }
  for (const name of ["modality", "expert", "date_from", "date_to", "study", "patient", "group"]) {
    const value = element(name).value.trim();
    if (value && !element(name).closest("label").hidden) body[name] = value;
  }
  return body;
}

function line(parent, text, className) {
  const row = document.createElement("div");
  row.textContent = text;
  if (className) row.className = className;
  parent.appendChild(row);
}

function card(hit) {
  const box = document.createElement("article");
  box.className = "hit";
  const picture = document.createElement("img");
  picture.src = hit.thumbnail;
  picture.alt = `hit ${hit.rank}`;
  box.appendChild(picture);
  line(box, `#${hit.rank}  ${hit.score.toFixed(3)}`, "score");
  line(box, `expert: ${hit.expert}`, "expert");
  line(box, hit.id, "id");
  if (hit.modality) line(box, `modality tag: ${hit.modality}`, "modality");
  if (hit.study_date) line(box, `study date: ${hit.study_date}`, "date");
  if (hit.study_uid) line(box, `study: ${hit.study_uid}`, "study");
  if (hit.series_uid) line(box, `series: ${hit.series_uid}`, "series");
  if (hit.sop_instance_uid) line(box, `instance: ${hit.sop_instance_uid}`, "instance");
  if (hit.matches) line(box, `${hit.matches} matching images`, "matches");
  if (hit.viewer) {
    const link = document.createElement("a");
    link.href = hit.viewer;
    link.textContent = "open in the viewer";
    link.className = "viewer";
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    box.appendChild(link);
  }
  return box;
}

async function search(page) {
  element("error").hidden = true;
  element("status").textContent = "searching ...";
  const started = performance.now();
  try {
    const response = await fetch("api/search", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(await request(page)),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    const results = element("results");
    results.replaceChildren(...answer.hits.map(card));
    currentPage = answer.page;
    element("page").textContent = `page ${answer.page}`;
    element("previous").disabled = answer.page <= 1;
    element("next").disabled = !answer.more;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    element("status").textContent = `${answer.hits.length} hits in ${seconds} s`;
  } catch (error) {
    element("status").textContent = "";
    element("error").textContent = error.message;
    element("error").hidden = false;
  }
}

element("query").addEventListener("submit", (event) => { event.preventDefault(); search(1); });
element("previous").addEventListener("click", () => search(currentPage - 1));
element("next").addEventListener("click", () => search(currentPage + 1));
element("image").addEventListener("change", () => { if (element("image").files.length) element("text").value = ""; });
element("text").addEventListener("input", () => { element("image").value = ""; });
describeArchive();
