// Copies the module's load line; the only script on Graft's pages (no inline script: CSP).
document.addEventListener("click", (event) => {
  const button = event.target.closest(".copy-button");
  if (!button) return;
  navigator.clipboard.writeText(button.dataset.copy).then(() => {
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
});
