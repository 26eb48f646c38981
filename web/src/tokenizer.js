// The BERT WordPiece tokenizer of a `tokenizer.json` (Hugging Face tokenizers format), for the
// configurations Graft's text modules use: BertNormalizer, BertPreTokenizer, WordPiece and a
// [CLS] A [SEP] template. Anything else is refused when the site is built, not guessed at.

function isControl(ch) {
  if (ch === "\t" || ch === "\n" || ch === "\r") return false;
  return /\p{Cc}|\p{Cf}/u.test(ch);
}

function isWhitespace(ch) {
  return ch === " " || ch === "\t" || ch === "\n" || ch === "\r" || /\p{Zs}/u.test(ch);
}

function isPunctuation(ch) {
  const cp = ch.codePointAt(0);
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
      (cp >= 123 && cp <= 126)) return true;
  return /\p{P}/u.test(ch);
}

function isChinese(cp) {
  return (cp >= 0x4e00 && cp <= 0x9fff) || (cp >= 0x3400 && cp <= 0x4dbf) ||
    (cp >= 0x20000 && cp <= 0x2a6df) || (cp >= 0x2a700 && cp <= 0x2b73f) ||
    (cp >= 0x2b740 && cp <= 0x2b81f) || (cp >= 0x2b820 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0x2f800 && cp <= 0x2fa1f);
}

export class WordPieceTokenizer {
  /** @param {object} spec the parsed tokenizer.json; @param {number} maxLength tokens */
  constructor(spec, maxLength) {
    const model = spec.model;
    this.vocab = new Map(Object.entries(model.vocab));
    this.unk = model.unk_token;
    this.prefix = model.continuing_subword_prefix ?? "##";
    this.maxChars = model.max_input_chars_per_word ?? 100;
    const norm = spec.normalizer || {};
    this.lowercase = norm.lowercase !== false;
    this.stripAccents = norm.strip_accents ?? this.lowercase;
    this.cleanText = norm.clean_text !== false;
    this.chinese = norm.handle_chinese_chars !== false;
    const single = spec.post_processor.single;
    this.before = [];
    this.after = [];
    let seen = false;
    for (const piece of single) {
      if (piece.Sequence) { seen = true; continue; }
      const id = spec.post_processor.special_tokens[piece.SpecialToken.id].ids[0];
      (seen ? this.after : this.before).push(id);
    }
    this.maxLength = maxLength;
  }

  normalize(text) {
    let out = "";
    for (const ch of text) {
      const cp = ch.codePointAt(0);
      if (this.cleanText) {
        if (cp === 0 || cp === 0xfffd || isControl(ch)) continue;
        if (isWhitespace(ch)) { out += " "; continue; }
      }
      out += this.chinese && isChinese(cp) ? ` ${ch} ` : ch;
    }
    if (this.stripAccents) out = out.normalize("NFD").replace(/\p{Mn}/gu, "");
    if (this.lowercase) out = out.toLowerCase();
    return out;
  }

  words(text) {
    const words = [];
    let current = "";
    for (const ch of text) {
      if (isWhitespace(ch)) {
        if (current) words.push(current);
        current = "";
      } else if (isPunctuation(ch)) {
        if (current) words.push(current);
        words.push(ch);
        current = "";
      } else {
        current += ch;
      }
    }
    if (current) words.push(current);
    return words;
  }

  wordPieces(word) {
    const chars = Array.from(word);
    if (chars.length > this.maxChars) return [this.vocab.get(this.unk)];
    const ids = [];
    let start = 0;
    while (start < chars.length) {
      let end = chars.length;
      let found = null;
      while (start < end) {
        const piece = (start > 0 ? this.prefix : "") + chars.slice(start, end).join("");
        if (this.vocab.has(piece)) { found = this.vocab.get(piece); break; }
        end -= 1;
      }
      if (found === null) return [this.vocab.get(this.unk)];
      ids.push(found);
      start = end;
    }
    return ids;
  }

  /** Token ids of one string: [CLS] pieces... [SEP], truncated to maxLength in all. */
  encode(text) {
    let ids = [];
    for (const word of this.words(this.normalize(text))) ids.push(...this.wordPieces(word));
    const room = this.maxLength - this.before.length - this.after.length;
    ids = ids.slice(0, Math.max(room, 0));
    return [...this.before, ...ids, ...this.after];
  }
}
