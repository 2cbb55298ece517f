"""Captions of the CIFAR-10 testbed: templates x class names (the class word or a synonym).

Training draws a template from TRAIN_TEMPLATES and a name from SYNONYMS[class]; HELD_OUT_TEMPLATES never
appear in training, so generations from them measure paraphrase robustness. `{a}` is the indefinite article
that fits the name ('a' or 'an'). Light module (no torch), so configs and reports can import it.
"""
from __future__ import annotations

import re
from collections.abc import Callable

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "plane", "aircraft", "jet", "airliner"),
    "automobile": ("automobile", "car", "sedan", "motorcar"),
    "bird": ("bird", "sparrow", "songbird", "finch"),
    "cat": ("cat", "kitten", "kitty", "tabby"),
    "deer": ("deer", "stag", "doe", "fawn"),
    "dog": ("dog", "puppy", "hound", "doggy"),
    "frog": ("frog", "toad", "bullfrog"),
    "horse": ("horse", "stallion", "pony", "mare"),
    "ship": ("ship", "boat", "vessel", "freighter"),
    "truck": ("truck", "lorry", "dump truck"),
}
TRAIN_TEMPLATES = (
    "a photo of {a} {}",
    "a photo of the {}",
    "a picture of {a} {}",
    "an image of the {}",
    "a small photo of {a} {}",
    "a blurry photo of the {}",
    "a close-up photo of {a} {}",
    "{a} {}",
)
HELD_OUT_TEMPLATES = (
    "a snapshot of {a} {}",
    "a good picture of the {}",
    "a rendering of {a} {}",
)
QUALITY_PROMPT = "a photo of {a} {}"
"""The prompt of the quality bar: generations from it are judged by the CIFAR-10 classifier."""


def article(name: str) -> str:
    """The indefinite article for `name`."""
    return "an" if name[0] in "aeiou" else "a"


def caption(template: str, name: str) -> str:
    """`template` filled with `name` and its article."""
    return template.replace("{a}", article(name)).replace("{}", name)


def training_captions() -> list[tuple[str, int]]:
    """Every (caption, class index) that training draws from: each train template with each name of each class."""
    return [(caption(template, name), label) for label, cls in enumerate(CLASSES)
            for template in TRAIN_TEMPLATES for name in SYNONYMS[cls]]


def all_words() -> list[str]:
    """Every word (run of letters, as CLIP's tokenizer splits text) of every template and class name, training and
    held out, sorted: the words the testbed tokenizer keeps whole."""
    texts = [*TRAIN_TEMPLATES, *HELD_OUT_TEMPLATES, *(name for names in SYNONYMS.values() for name in names), "a an"]
    return sorted({w for text in texts for w in re.findall(r"[a-z]+", text)})


def prompt_groups(classes: list[str], target: str | None = None) -> dict[str, list[tuple[str, int]]]:
    """(prompt, class index) of each evaluation group: the erased classes' quality prompts, held-out templates
    and synonyms, the retained classes' quality prompts and, when given, the target prompt (whose base images
    judged as an erased class are the floor an erasure towards it can reach)."""
    def pairs(texts_of: Callable[[str], list[str]], names: list[str]) -> list[tuple[str, int]]:
        return [(text, CLASSES.index(name)) for name in names for text in texts_of(name)]

    return {"forget": pairs(lambda n: [caption(QUALITY_PROMPT, n)], classes),
            "held_out": pairs(lambda n: [caption(t, n) for t in HELD_OUT_TEMPLATES], classes),
            "synonyms": pairs(lambda n: [caption(QUALITY_PROMPT, s) for s in SYNONYMS[n] if s != n], classes),
            "retained": pairs(lambda n: [caption(QUALITY_PROMPT, n)], [c for c in CLASSES if c not in classes]),
            **({"target": [(target, -1)]} if target is not None else {})}
