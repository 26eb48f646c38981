"""The page for a text module: the page's WordPiece tokenizer gives the token ids of the
module's tokenizer.json, the embeddings match PyTorch, and a head trains on typed examples."""

from __future__ import annotations

import pytest
import torch

import graft

pytestmark = [pytest.mark.pretrained, pytest.mark.slow]

SENTENCES = (
    "Graft loads modules by name.",
    "Héllo, WÖRLD!! naïve café — déjà vu…",
    "don't stop: e-mail me @ foo.bar#1 (ok?)",
    "中文字符和English混合 and antidisestablishmentarianism",
    "tabs\tand\nnewlines, emoji 😀, the ﬁ ligature and Ångström",
    "word " * 300,  # truncated at the module's 256 tokens
)


def test_text_page_tokenizes_and_embeds_as_pytorch(web_store, browser, text_site_url, tmp_path):
    from tokenizers import Tokenizer

    module = graft.load("minilm-l6")
    pre = module.manifest.signatures["embed"].preprocess
    tokenizer = Tokenizer.from_file(str(module.directory / pre.tokenizer))
    tokenizer.enable_truncation(max_length=pre.max_length)
    tokenizer.no_padding()  # one string: the module pads a batch to its longest only
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(text_site_url)
    assert page.evaluate("window.graftPage.ready") is True
    assert page.query_selector("#try-file") is None  # a text module takes no files
    for sentence in SENTENCES:
        page.evaluate("window.graftPage.last = null")
        page.fill("#try-text", sentence)
        page.click("#try-run")
        page.wait_for_function("window.graftPage.last !== null", timeout=60_000)
        shown = page.evaluate("window.graftPage.last")
        assert shown["ids"] == tokenizer.encode(sentence).ids, sentence
        with torch.no_grad():
            expected = module.call("embed", [sentence])[0].double()
        torch.testing.assert_close(torch.tensor(shown["values"], dtype=torch.float64), expected,
                                   atol=1e-4, rtol=0)
    assert "384 values, norm 1.0000" in page.inner_text("#embedding")
    page.screenshot(path=str(tmp_path / "text.png"), full_page=True)

    # Typed examples train a head; an empty text box is a message, not a crash.
    rows = page.locator(".class")
    for i, lines in enumerate((["I love this film", "what a wonderful day"],
                               ["this is terrible", "I hate waiting in the rain"])):
        rows.nth(i).locator(".class-text").fill("\n".join(lines))
        rows.nth(i).locator(".class-add-text").click()
        page.wait_for_function(f"window.graftPage.examples[{i}].features.length === 2")
    page.fill("#try-text", "   ")
    page.click("#try-run")
    page.wait_for_selector("#message:not([hidden])")
    assert page.inner_text("#message") == "Type some text first"
    page.click("#train-run")
    page.wait_for_function("window.graftPage.training !== null", timeout=60_000)
    assert page.evaluate("window.graftPage.training.accuracy") == 1.0
    assert errors == []
    context.close()
