"""Text helpers the scorers and judges share: answer letters, option texts, answer normalising,
the first (stance) sentence of a reply. Pure functions of strings; no scorer lives here."""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

# ======================================================================= answer letters


def choice_letters(choices: Optional[str]) -> str:
    """Letters labelling the options of a choices block ("A) x\\nB) y" -> "AB"); "" if none."""
    if not isinstance(choices, str):
        return ""
    found = re.findall(r"(?m)^\s*[\(\[]?([A-Za-z])[\)\]\.:](?=\s|$)", choices)
    return "".join(dict.fromkeys(letter.upper() for letter in found))


# Words after a capital "A"/"I" that make it an answer letter rather than an article/pronoun:
# "A is correct" vs "A good question".
_LETTER_VERBS = r"(?:is|was|seems|appears|looks|would|should|must|remains|fits|matches)\b"
_ADVERBS = (
    r"(?:(?:definitely|clearly|still|indeed|actually|probably|certainly|obviously|"
    r"most\s+likely|likely|now|simply)\s*,?\s*)?"
)
_STRONG_MARKERS = (
    r"(?:\b(?:final|correct|right|best|my)\s+(?:answer|choice|option|letter|response)"
    r"(?:\s+(?:is|remains|would\s+be|will\s+be|must\s+be|should\s+be))?\s*[:=\-]?"
    r"|\banswer\s*(?:is|remains|would\s+be|will\s+be|must\s+be|should\s+be|[:=])"
    r"|\bI(?:'d|\s+would|'ll|\s+will)?\s+(?:go\s+with|choose|pick|select|say|stick\s+with|stand\s+by|opt\s+for)"
    r"|\b(?:going|sticking)\s+with"
    r"|\\boxed\{)"
)
_HEDGE = re.compile(
    r"\b(?:could|might|may)\s+be\b|\bnot\s+(?:sure|certain)\b|\bunsure\b|\beither\b"
    r"|\bhard\s+to\s+(?:say|tell)\b|\b(?:don't|do\s+not)\s+know\b"
    r"|\b(?:cannot|can't|can\s+not|unable\s+to|won't)\s+(?:answer|determine|say|tell|choose|decide|be\s+sure|provide)",
    re.IGNORECASE,
)
_NEGATED_BEFORE = re.compile(
    r"(?:\bnot|n't|\bthan|\binstead\s+of|\bexcept)\s+(?:option\s+|choice\s+)?[\(\[]?\s*$", re.IGNORECASE
)


def extract_letter(reply: Optional[str], choices_letters: str = "ABCD") -> Optional[str]:
    """The answer letter a reply commits to, or None when it commits to none or to several.

    Rules, in order (the first that decides wins):
      1. Empty reply -> None. Markdown emphasis (``**``, ``*``, backticks) is removed first.
      2. The whole reply is one letter, optionally bracketed/punctuated ("B", "b)", "(C).").
      3. Strong markers: "answer is/:", "correct/final/my answer|choice|option (is)",
         "I'd go with / choose / pick / say / stand by", "\\boxed{}", followed by an optional
         adverb ("definitely") and "option"/"choice", then the letter. The LAST such statement
         wins (self-corrections come last); "A or B" right after the marker -> None. After a
         marker a capital letter always counts; a lower-case "a"/"i" only when bracketed or
         followed by punctuation ("the answer is a matter..." is prose).
      4. Hedges and refusals ("could be", "not sure", "either", "I cannot answer") -> None.
      5. Weak markers: "option B", "(B)", a line starting "B)" / "B." / "B:". Exactly one
         distinct letter -> it; several -> None.
      6. Stand-alone capital letters ("I think it's B."). "A"/"I" followed by a lower-case word
         are an article/pronoun unless the word is a verb like "is" ("A is correct").
         Exactly one distinct letter -> it; several -> None.
    In rules 5-6 a letter right after "not", "n't", "than", "instead of", "except" is ignored
    ("not A, it's C" -> C). Letters inside words never count; letters outside
    `choices_letters` never count.
    """
    if not reply or not reply.strip():
        return None
    letters = "".join(dict.fromkeys(choices_letters.upper()))
    text = re.sub(r"\*+|`+|__", "", reply).strip()
    cls = f"[{re.escape(letters)}{re.escape(letters.lower())}]"
    for rule in (_rule_bare, _rule_strong):
        found = rule(text, cls)
        if found is not _NO_DECISION:
            return found
    if _HEDGE.search(text):
        return None
    for rule in (_rule_weak, _rule_standalone):
        found = rule(text, cls)
        if found is not _NO_DECISION:
            return found
    return None


_NO_DECISION = object()


def _rule_bare(text: str, cls: str):
    m = re.fullmatch(rf"[\(\[]?\s*({cls})\s*[\)\]\.:]?\s*[.!]?", text)
    return m.group(1).upper() if m else _NO_DECISION


def _rule_strong(text: str, cls: str):
    pattern = re.compile(
        _STRONG_MARKERS + r"\s*[:=\-]?\s*" + _ADVERBS + r"(?:(?:option|choice|letter)\s+)?"
        rf"(?P<open>[\(\[])?\s*(?P<letter>{cls})(?![A-Za-z0-9'])\s*(?P<close>[\)\]\}}])?"
        rf"(?P<rest>\s*(?:or|and|/)\s*(?:option\s+)?[\(\[]?{cls}(?![A-Za-z0-9']))?",
        re.IGNORECASE,
    )
    decided = _NO_DECISION
    for m in pattern.finditer(text):
        letter = m.group("letter")
        after = text[m.end("letter") : m.end("letter") + 1]
        if (
            letter.islower()
            and letter in "ai"
            and not (m.group("open") or m.group("close"))
            and after not in ("", ".", ",", ":", ";", "!", "?", ")")
        ):
            continue  # "the answer is a matter of taste"
        decided = None if m.group("rest") else letter.upper()
    return decided


def _rule_weak(text: str, cls: str):
    upper = cls.upper()
    patterns = (
        rf"\b(?:option|choice)\s+[\(\[]?({upper})(?![A-Za-z0-9'])",
        rf"[\(\[]({cls})[\)\]]",
        rf"(?m)^\s*({upper})[\)\.:](?=\s|$)",
        rf"(?m)^\s*({cls})\)(?=\s|$)",
    )
    found = {
        m.group(1).upper() for p in patterns for m in re.finditer(p, text, flags=0) if not _negated(text, m.start())
    }
    if len(found) == 1:
        return found.pop()
    return None if found else _NO_DECISION


def _rule_standalone(text: str, cls: str):
    upper = cls.upper()
    found = set()
    for m in re.finditer(rf"(?<![A-Za-z0-9.\-/'])({upper})(?![A-Za-z0-9'+#\-])", text):
        letter = m.group(1)
        if letter in "AI":
            following = text[m.end() :]
            if re.match(r"\s+[a-z]", following) and not re.match(rf"\s+{_LETTER_VERBS}", following):
                continue  # article or pronoun: "A good question", "I think"
        if not _negated(text, m.start()):
            found.add(letter)
    return found.pop() if len(found) == 1 else None


def _negated(text: str, start: int) -> bool:
    return bool(_NEGATED_BEFORE.search(text[max(0, start - 30) : start]))


# ======================================================================= option texts, answers

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalise_answer(text) -> str:
    """Lower case, accents and punctuation removed, articles dropped, whitespace collapsed
    ("The Río-Blanco!" -> "rio blanco"); numbers keep their digits ("3.5" -> "3 5")."""
    text = unicodedata.normalize("NFKD", str(text or ""))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def choice_texts(choices: Optional[str]) -> dict[str, str]:
    """Letter -> option text of a choices block ("A) Paris\nB) Rome" -> {"A": "Paris", "B": "Rome"})."""
    if not isinstance(choices, str):
        return {}
    found = re.findall(r"(?m)^\s*[\(\[]?([A-Za-z])[\)\]\.:]\s+(.*\S)\s*$", choices)
    return {letter.upper(): text for letter, text in reversed(found)} if found else {}


# ======================================================================= the stance sentence

_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "approx", "cf", "u.s", "no"}
_LABEL = re.compile(
    r"^(?:here(?:'s|\s+is)\s+)?(?:(?:my|a|final|revised|firm|initial|first|overall)\s+)*"
    r"(?:stance|position|view|answer|summary|response)\s*(?::|$)\s*",
    re.IGNORECASE,
)
_FILLER = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|alright|great question|good question|"
    r"here(?:'s| is) (?:my|a) .*)[.!:,]?$",
    re.IGNORECASE,
)


def first_sentence(text: Optional[str]) -> str:
    """The stance sentence of a reply: its first real sentence.

    Markdown, list bullets, echoed labels ("Revised stance:") and filler openers ("Sure!")
    are skipped, because they say nothing about the stance and would dominate a short
    embedding. Abbreviations ("e.g.") and decimals do not end a sentence.
    """
    for line in (text or "").splitlines():
        line = re.sub(r"[*_`#>]+", "", line).strip()
        line = re.sub(r"^(?:[-•]\s+|\d+[.)]\s+)", "", line)
        while line:
            line = _LABEL.sub("", line).strip()
            sentence, rest = _split_first(line)
            if sentence and (not _FILLER.match(sentence) or not rest):
                return sentence
            line = rest
    return ""


def _split_first(line: str) -> tuple[str, str]:
    for m in re.finditer(r"[.!?]+(?=\s|$)", line):
        word = re.search(r"([\w.]+)$", line[: m.start()])
        if m.group() == "." and word and word.group(1).lower() in _ABBREVIATIONS:
            continue
        return line[: m.end()].strip(), line[m.end() :].strip()
    return line.strip(), ""
