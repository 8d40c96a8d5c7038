"""The question-rephrasing bank of GDQA's "rephrase" variants (methods/augmentation.py): prompt text, like
data/prompts.py's templates, which the start-up validation (data/validation.py) also counts.

SSG-VQA questions are parsed into their target phrase (e.g. "red anatomy that is above the liver
anatomy") and re-rendered with every form seen in the released files, the GDQA file's rephrasings
included (their "a anatomy" and "?;" quirks kept as the authors' data has them). Other questions
(OmniMedVQA style) get generic wrappers.
"""

from __future__ import annotations

import re

# Every question form of SSG-VQA in the released files, with {np} the target phrase.
SSG_TEMPLATES = (
    "What is the name of the {np}?",
    "What name is the {np}?",
    "What is the {np}?",
    "There is a {np}, what is its name?",
    "There is a {np}; what is it?",
    "There is a {np}?; what is its name?",
    "There is a {np}?; what name is it?",
)
LOCATIONS = frozenset(
    f"{v}-{h}" for v in ("top", "mid", "bottom") for h in ("left", "mid", "right")
) | {"center"}
# The location form; {loc} is top-left, top-mid, center, ... ("{loc} anatomy" is its target phrase).
LOCATION_TEMPLATE = "What anatomy is at the {loc} of the frame ?"
# Generic rewordings for questions outside the SSG-VQA grammar; {q} the question, {ql} lower-cased.
GENERIC_TEMPLATES = (
    "{q}",
    "Based on the image, {ql}",
    "Looking at this image, {ql}",
    "Examine the image carefully. {q}",
    "{q} Choose the best option.",
    "Question about the image: {q}",
)

_LOCATION_RE = re.compile(r"^What anatomy is at the (?P<loc>[\w-]+) of the frame \?$")
_SSG_RES = tuple(
    re.compile(p)
    for p in (
        r"^What is the name of the (?P<np>[^?;]+)\?$",
        r"^What name is the (?P<np>[^?;]+)\?$",
        r"^What is the (?P<np>[^?;]+)\?$",
        r"^There is a (?P<np>[^?;,]+), what is its name\?$",
        r"^There is a (?P<np>[^?;]+)\??; what (?:is it|is its name|name is it)\?$",
    )
)


# The words of SSG-VQA target phrases (all seen in the released files, plus the other CholecT45
# classes and colours); a phrase with any other word is not treated as SSG-VQA.
_SSG_HEADS = frozenset({"anatomy", "object", "thing", "instrument"})
_SSG_WORDS = _SSG_HEADS | LOCATIONS | frozenset(
    "the that is and of both by within above below left right on side to vertical horizontal "
    "red brown white yellow silver blue green black gray pink retracted coagulated "
    "liver gallbladder omentum gut abdominal_wall_cavity cystic_plate cystic_duct cystic_artery "
    "cystic_pedicle blood_vessel fluid peritoneum adhesion "
    "grasper bipolar hook scissors clipper irrigator specimenbag specimen_bag".split()
)


def parse_ssg_question(question: str) -> str | None:
    """The target phrase of an SSG-VQA question ("brown top-mid anatomy"), None if not one."""
    q = question.strip()
    m = _LOCATION_RE.match(q)
    if m:  # the released files have 2 "at the None of the frame" questions: no SSG target then
        return f"{m.group('loc')} anatomy" if m.group("loc") in LOCATIONS else None
    for pattern in _SSG_RES:
        m = pattern.match(q)
        if m:
            words = set(m.group("np").split())
            return m.group("np").strip() if words <= _SSG_WORDS and words & _SSG_HEADS else None
    return None


def _lower_first(q: str) -> str:
    first = q.split(" ", 1)[0]
    return q if first.isupper() or any(c.isupper() for c in first[1:]) else q[:1].lower() + q[1:]


def question_rephrasings(question: str) -> list[str]:
    """Every distinct bank rendering of `question`, the question itself excluded, in bank order."""
    q = question.strip()
    phrase = parse_ssg_question(q)
    if phrase is not None:
        forms = [t.format(np=phrase) for t in SSG_TEMPLATES]
        loc = phrase.removesuffix(" anatomy")
        if loc in LOCATIONS:
            forms.insert(0, LOCATION_TEMPLATE.format(loc=loc))
    else:
        forms = [t.format(q=q, ql=_lower_first(q)) for t in GENERIC_TEMPLATES]
    return [f for f in dict.fromkeys(forms) if f != q]
