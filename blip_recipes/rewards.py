"""Caption rewards for self-critical training (scst.py): CIDEr-D and BLEU-4 in process, per caption.

Why not pycocoevalcap's scorers: they score a whole corpus per call and take document frequencies from the images
being scored. A reward scores a few sampled captions per image, many times a step, against document frequencies
fixed from the training references (as self-critical training does: the corpus is the training set). The formulas
are pycocoevalcap's own, term for term (tests/test_scst.py compares both on one corpus to 1e-6), including two
quirks kept on purpose: the length penalty compares bigram counts, and a hypothesis n-gram's weight is clipped at
the reference's (CIDEr-D).

Captions are compared as PTB-tokenised, lowercase words without punctuation. References are tokenised once with
pycocoevalcap's Stanford PTB tokenizer (metrics.ptb_tokenize, what evaluation uses); sampled captions, which BLIP's
uncased tokenizer already lowercases and splits, with `simple_tokenize` in process (no JVM per step).
"""

import math
import re
from collections import Counter, defaultdict

# What pycocoevalcap's PTBTokenizer drops after tokenising.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])  # fmt: skip
# As the PTB tokenizer splits: "..." and "--" whole, clitics apart ("cat's" -> cat 's, "don't" -> do n't), any other
# punctuation mark alone; brackets become -lrb- etc. (lowercased, so pycocoevalcap's filter keeps them).
_TOKENS = re.compile(r"\.\.\.|--|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+?(?=n't\b)|\w+|[^\w\s]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def simple_tokenize(text: str) -> str:
    """Lowercase words with the PTB punctuation tokens removed (BLIP's decoded captions are already lowercase)."""
    tokens = _TOKENS.findall(text.lower())
    return " ".join(_BRACKETS.get(token, token) for token in tokens if token not in PTB_PUNCTUATION)


def ngram_counts(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D (n = 1..4, sigma = 6) of a caption against one image's references, with document frequencies from a
    fixed corpus: `references[i]` = the tokenised references of image i."""

    def __init__(self, references: list[list[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.references = [[ngram_counts(ref, n) for ref in refs] for refs in references]
        self.document_frequency: Counter = Counter()
        for refs in self.references:
            self.document_frequency.update({gram for counts in refs for gram in counts})
        self.log_corpus_size = math.log(float(len(references)))

    def _vector(self, counts: Counter):
        vector = [defaultdict(float) for _ in range(self.n)]
        norms = [0.0] * self.n
        length = 0
        for gram, frequency in counts.items():
            order = len(gram) - 1
            weight = float(frequency) * (self.log_corpus_size - math.log(max(1.0, self.document_frequency[gram])))
            vector[order][gram] = weight
            norms[order] += weight * weight
            if order == 1:  # pycocoevalcap counts bigrams as the length
                length += frequency
        return vector, [math.sqrt(norm) for norm in norms], length

    def score(self, caption: str, image: int) -> float:
        """CIDEr-D of the tokenised `caption` for image `image` (an index into `references`)."""
        vector, norms, length = self._vector(ngram_counts(caption, self.n))
        total = 0.0
        for ref_counts in self.references[image]:
            ref_vector, ref_norms, ref_length = self._vector(ref_counts)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for order in range(self.n):
                value = sum(
                    min(weight, ref_vector[order].get(gram, 0.0)) * ref_vector[order].get(gram, 0.0)
                    for gram, weight in vector[order].items()
                )
                if norms[order] != 0 and ref_norms[order] != 0:
                    value /= norms[order] * ref_norms[order]
                total += value * penalty
        return total / self.n / len(self.references[image]) * 10.0


def bleu4(caption: str, references: list[str]) -> float:
    """Sentence BLEU-4 as pycocoevalcap's BleuScorer scores one sentence ("closest" reference length, its tiny
    smoothing constants), for an optional share of the reward."""
    words = caption.split()
    counts = ngram_counts(caption)
    maximum: dict = {}
    ref_lengths = []
    for reference in references:
        ref_lengths.append(len(reference.split()))
        for gram, count in ngram_counts(reference).items():
            maximum[gram] = max(maximum.get(gram, 0), count)
    length = len(words)
    closest = min(ref_lengths, key=lambda ref_length: (abs(ref_length - length), ref_length))
    tiny, small = 1e-15, 1e-9
    correct = [0] * 4
    guesses = [max(0, length - k) for k in range(4)]
    for gram, count in counts.items():
        correct[len(gram) - 1] += min(maximum.get(gram, 0), count)
    product = 1.0
    for k in range(4):
        product *= (float(correct[k]) + tiny) / (float(guesses[k]) + small)
    score = product ** (1.0 / 4)
    ratio = (length + tiny) / (closest + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score
