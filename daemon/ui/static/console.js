// postbackd web console: progressive enhancement only; every page works without this file.
"use strict";
(function () {
  // Filter forms with data-autosubmit apply a changed <select> at once.
  document.querySelectorAll("form[data-autosubmit] select").forEach(function (select) {
    select.addEventListener("change", function () { select.form.requestSubmit(); });
  });

  // Forms with data-confirm ask in a <dialog> before they are sent.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    var confirmed = false;
    form.addEventListener("submit", function (event) {
      if (confirmed || typeof HTMLDialogElement !== "function") { return; }
      event.preventDefault();
      var dialog = document.createElement("dialog");
      dialog.setAttribute("aria-labelledby", "confirm-text");
      var text = document.createElement("p");
      text.id = "confirm-text";
      text.textContent = form.getAttribute("data-confirm");
      var actions = document.createElement("div");
      actions.className = "actions";
      var cancel = document.createElement("button");
      cancel.type = "button";
      cancel.textContent = "Cancel";
      var ok = document.createElement("button");
      ok.type = "button";
      ok.className = "primary danger";
      ok.textContent = "Yes, go ahead";
      actions.append(cancel, ok);
      dialog.append(text, actions);
      document.body.append(dialog);
      cancel.addEventListener("click", function () { dialog.close(); });
      dialog.addEventListener("close", function () { dialog.remove(); });
      ok.addEventListener("click", function () {
        confirmed = true;
        dialog.close();
        form.requestSubmit(event.submitter || undefined);
      });
      dialog.showModal();
      cancel.focus();
    });
  });

  // Delete: the button stays disabled until the id is typed back exactly.
  document.querySelectorAll("input[data-must-equal]").forEach(function (input) {
    var button = input.form.querySelector("button[type=submit]");
    function check() { button.disabled = input.value.trim() !== input.getAttribute("data-must-equal"); }
    input.addEventListener("input", check);
    check();
  });

  // Duplicate: one box ticks or clears every postback.
  document.querySelectorAll("input[data-check-all]").forEach(function (all) {
    var row = all.closest("[data-all-row]");
    if (row) { row.hidden = false; }
    all.addEventListener("change", function () {
      all.form.querySelectorAll("input[name='" + all.getAttribute("data-check-all") + "']").forEach(function (box) {
        box.checked = all.checked;
      });
    });
  });
})();
