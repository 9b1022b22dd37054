// Loaded in <head>, not deferred: the class hides what only a browser without JavaScript needs
// (e.g. the destination form's "Show the fields" button) before the page is first painted.
document.documentElement.classList.add("js");
// htmx does not swap 4xx/5xx answers: say so instead of leaving a click without effect.
document.addEventListener("htmx:responseError", function (event) {
  var status = event.detail.xhr.status;
  var text = status === 403 ? "Your role does not allow this action (403)." :
    "The server answered " + status + ": nothing was changed; reload the page and try again.";
  var box = document.getElementById("ui-error");
  box.textContent = text;
  box.hidden = false;
});
document.addEventListener("htmx:sendError", function () {
  var box = document.getElementById("ui-error");
  box.textContent = "The server cannot be reached; the page will catch up when it is back.";
  box.hidden = false;
});
document.addEventListener("htmx:afterRequest", function (event) {
  if (event.detail.successful) { document.getElementById("ui-error").hidden = true; }
});
