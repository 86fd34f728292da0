"""Pure-Python references for the tokenizer tests: design.md §1 written plainly, no molecule_gpt import.

Two references, each as short and literal as possible (speed is irrelevant):

- `OriginalTokenizer`: design.md §1 exactly as the original implementation behaves, on strings:
  symbols are strings, `</w>` is a string, characters never seen at birth are dropped by
  `encode` (the §8.2 defect), and its state exports to the original checkpoint's "tokenizer"
  object. Used to check that `EvolvingTokenizer.from_original` reproduces the original's ids,
  and that our trainer picks the same merges (same tie rule) on text of known characters.

- `ReferenceTokenizer`: the design molecule_gpt implements (module docstring of
  molecule_gpt/tokenizer.py): the same design.md §1 over token ids, plus byte fallback, so nothing is
  dropped. A token is identified by (bytes it decodes to, ends-a-word flag). Training recounts
  every pair every round; ties go to the pair met first when scanning the distinct words in
  first-occurrence order, symbols left to right (a dict's insertion order + max(), as the
  original). The compiled trainer must match it merge for merge.
"""
from collections import Counter

MARKER = "</w>"
PAD, BOS, EOS = "<PAD>", "<BOS>", "<EOS>"
EOW = -1  # the end-of-word marker as a symbol id in ReferenceTokenizer


# ----------------------------------------------------------------------------------------------
# design.md §1 on strings, as the original does it


class OriginalTokenizer:
    def __init__(self, lines):
        base_text = "\n".join(lines) + "\n"
        self.tokens = sorted(set(base_text)) + [PAD, BOS, EOS]
        self.stoi = {t: i for i, t in enumerate(self.tokens)}
        self.bpe_enabled = False
        self.merges = []            # [(a, b)] in rank order
        self.trained_chars = len(base_text)

    def train_bpe(self, lines, num_merges):
        words = " ".join(lines).split()
        vocab = Counter(tuple(list(w) + [MARKER]) for w in words)
        merges = []
        for _ in range(num_merges):
            pairs = {}
            for syms, freq in vocab.items():
                for i in range(len(syms) - 1):
                    pairs[(syms[i], syms[i + 1])] = pairs.get((syms[i], syms[i + 1]), 0) + freq
            if not pairs:
                break
            best = max(pairs, key=pairs.get)    # first maximal pair in insertion order
            merges.append(best)
            new_tok = best[0] + best[1]
            new_vocab = Counter()
            for syms, freq in vocab.items():
                out, i = [], 0
                while i < len(syms):
                    if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                        out.append(new_tok)
                        i += 2
                    else:
                        out.append(syms[i])
                        i += 1
                new_vocab[tuple(out)] += freq
            vocab = new_vocab
            if new_tok not in self.stoi:
                self.stoi[new_tok] = len(self.tokens)
                self.tokens.append(new_tok)
        self.merges = merges
        self.bpe_enabled = True

    def _bpe_word(self, word):
        rank = {pair: i for i, pair in enumerate(self.merges)}   # a repeated pair keeps its last rank
        syms = list(word) + [MARKER]
        while len(syms) > 1:
            r, i = min((rank.get((syms[i], syms[i + 1]), float("inf")), i) for i in range(len(syms) - 1))
            if r == float("inf"):
                break
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        return syms

    def encode(self, s):
        s = s.strip()
        ids = [self.stoi[BOS]]
        if not self.bpe_enabled:
            ids += [self.stoi[ch] for ch in s if ch in self.stoi]
        else:
            words = s.split()
            for wi, w in enumerate(words):
                ids += [self.stoi[t] for t in self._bpe_word(w) if t != MARKER and t in self.stoi]
                if wi != len(words) - 1 and " " in self.stoi:
                    ids.append(self.stoi[" "])
        return ids + [self.stoi[EOS]]

    def decode(self, ids):
        out = []
        for t in ids:
            tok = self.tokens[t]
            if tok in (BOS, PAD):
                continue
            if tok == EOS:
                break
            out.append(tok)
        return " ".join("".join(out).replace(MARKER, "").split())

    def checkpoint_object(self):
        """The "tokenizer" object of the original's JSON checkpoint."""
        return {"tokens": list(self.tokens), "bpe_enabled": self.bpe_enabled,
                "merges": [list(p) for p in self.merges], "trained_chars": self.trained_chars}


# ----------------------------------------------------------------------------------------------
# The molecule_gpt design over ids, with byte fallback


UTF8_BYTES = [b for b in range(0xF5) if b not in (0xC0, 0xC1)]


class ReferenceTokenizer:
    def __init__(self, lines, byte_fallback=True):
        chars = sorted(set("\n".join(lines) + "\n"))
        self.tokens = []       # display strings
        self.surface = []      # bytes per id
        self.eow = []          # ends-a-word flag per id
        self.key = {}          # (surface, eow) -> id for non-special tokens
        for ch in chars:
            self._add(ch, ch.encode("utf-8", "surrogatepass"), False)
        self.pad_id = self._add(PAD, b"", False, special=True)
        self.bos_id = self._add(BOS, b"", False, special=True)
        self.eos_id = self._add(EOS, b"", False, special=True)
        self.char_id = {ch: i for i, ch in enumerate(chars)}
        if byte_fallback:
            for b in UTF8_BYTES:
                if not (b < 0x80 and chr(b) in self.char_id):
                    self._add(f"<0x{b:02X}>", bytes([b]), False)
        self.merges = []       # (a, b, m) ids; b may be EOW
        self.bpe_enabled = False

    def _add(self, display, surface, eow, special=False):
        self.tokens.append(display)
        self.surface.append(surface)
        self.eow.append(eow)
        if not special:
            self.key[(surface, eow)] = len(self.tokens) - 1
        return len(self.tokens) - 1

    def symbols(self, ch):
        """Base symbols of one character: its token, else the tokens of its UTF-8 bytes."""
        if ch in self.char_id:
            return [self.char_id[ch]]
        return [self.key[(bytes([b]), False)] for b in ch.encode("utf-8", "surrogatepass")]

    def merged(self, a, b):
        surface = self.surface[a] + (b"" if b == EOW else self.surface[b])
        eow = True if b == EOW else self.eow[b]
        if (surface, eow) not in self.key:
            self._add("merged", surface, eow)
        return self.key[(surface, eow)]

    def train_bpe(self, lines, num_merges):
        vocab = Counter()
        for line in lines:
            for w in line.split():
                vocab[tuple(s for ch in w for s in self.symbols(ch)) + (EOW,)] += 1
        merges = []
        for _ in range(num_merges):
            pairs = {}
            for syms, freq in vocab.items():
                for i in range(len(syms) - 1):
                    pairs[(syms[i], syms[i + 1])] = pairs.get((syms[i], syms[i + 1]), 0) + freq
            if not pairs:
                break
            a, b = max(pairs, key=pairs.get)
            m = self.merged(a, b)
            merges.append((a, b, m))
            new_vocab = Counter()
            for syms, freq in vocab.items():
                out, i = [], 0
                while i < len(syms):
                    if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                        out.append(m)
                        i += 2
                    else:
                        out.append(syms[i])
                        i += 1
                new_vocab[tuple(out)] += freq
            vocab = new_vocab
        self.merges = merges
        self.bpe_enabled = True

    def apply_merges(self, syms):
        rank = {(a, b): (r, m) for r, (a, b, m) in enumerate(self.merges)}
        syms = list(syms)
        while len(syms) > 1:
            cands = [(rank[(syms[i], syms[i + 1])][0], i) for i in range(len(syms) - 1)
                     if (syms[i], syms[i + 1]) in rank]
            if not cands:
                break
            _, i = min(cands)
            syms[i:i + 2] = [rank[(syms[i], syms[i + 1])][1]]
        return syms

    def encode(self, s):
        s = s.strip()
        ids = [self.bos_id]
        if not self.bpe_enabled:
            for ch in s:
                ids += self.symbols(ch)
        else:
            space = self.key[(b" ", False)]
            for wi, w in enumerate(s.split()):
                if wi:
                    ids.append(space)
                syms = [x for ch in w for x in self.symbols(ch)] + [EOW]
                ids += [t for t in self.apply_merges(syms) if t != EOW]
        return ids + [self.eos_id]

    def decode(self, ids):
        data = b""
        for t in ids:
            if t == self.eos_id:
                break
            if t not in (self.bos_id, self.pad_id):
                data += self.surface[t]
        return " ".join(data.decode("utf-8", "surrogatepass").split())
