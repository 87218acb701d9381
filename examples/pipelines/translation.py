"""Translation: identify each text's language, translate French and German to English.

py3langid (a real language-identification model, shipped inside its PyPI package) tags
each text; a filter per language sends French and German texts to their own
encoder-decoder transformer (seeded random weights, see models.py: the output is
deterministic token soup, the cost is a real greedy decode), marked `high_variance`
because its decode time grows with the text; every other text passes through
unchanged. The three branches are unioned.
"""

from __future__ import annotations

import numpy as np

import serveflow as sf
from examples.pipelines import models

TRANSLATED = ("fr", "de")
WORDS = {
    language: words.split()
    for language, words in {
        "fr": "le la les un une de des et est dans pour que qui pas sur avec nous vous ils "
        "maison voiture temps monde travail jour nuit ville livre pain eau grand petit "
        "toujours jamais beaucoup aujourd'hui demain hier parce mais aussi très bien",
        "de": "der die das und ist nicht ein eine ich du wir sie mit auf für von zu "
        "haus auto zeit welt arbeit tag nacht stadt buch brot wasser groß klein "
        "immer nie viel heute morgen gestern weil aber auch sehr gut schon noch",
        "en": "the a and is not in for that who on with we you they house car time world "
        "work day night city book bread water big small always never much today "
        "tomorrow yesterday because but also very good already still",
        "es": "el la los una de y es en para que quien no con nosotros ellos casa coche "
        "tiempo mundo trabajo día noche ciudad libro pan agua grande pequeño siempre "
        "nunca mucho hoy mañana ayer porque pero también muy bien",
    }.items()
}
SEEDS = {"fr": 301, "de": 302}


class LanguageId:
    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        models.one_thread()
        self.model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, row: sf.Row) -> tuple[str, str]:
        return row["text"], self.model.classify(row["text"])[0]


class Translator:
    """Greedy decoding with a seeded encoder-decoder transformer for `source`."""

    source = ""

    def __init__(self) -> None:
        self.model = models.Seq2Seq(SEEDS[self.source])

    def __call__(self, row: sf.Row) -> tuple[str, str, str]:
        target = self.model.translate(models.tokenize(row["text"]))
        return row["text"], row["lang"], models.detokenize(target)


class FrenchToEnglish(Translator):
    source = "fr"


class GermanToEnglish(Translator):
    source = "de"


def untranslated(row: sf.Row) -> tuple[str, str, str]:
    return row["text"], row["lang"], row["text"]


def build_flow() -> sf.Flow:
    flow = sf.Flow("translation", schema={"text": str})
    tagged = flow.map(LanguageId, names=["text", "lang"], name="langid")
    names = ["text", "lang", "translation"]
    french = tagged.filter(lambda r: r["lang"] == "fr", name="is_fr").map(
        FrenchToEnglish, names=names, high_variance=True, name="fr_en"
    )
    german = tagged.filter(lambda r: r["lang"] == "de", name="is_de").map(
        GermanToEnglish, names=names, high_variance=True, name="de_en"
    )
    other = tagged.filter(lambda r: r["lang"] not in TRANSLATED, name="is_other").map(
        untranslated, names=names, name="keep"
    )
    french.union(german, other)
    return flow


def make_inputs(n: int, seed: int) -> list[sf.Table]:
    """`n` requests of one sentence each: 4 to 16 words of French, German, English or
    Spanish (in turn), drawn from short word lists."""
    rng = np.random.default_rng(seed)
    languages = list(WORDS)
    tables = []
    for i in range(n):
        words = WORDS[languages[i % len(languages)]]
        picked = rng.choice(len(words), size=int(rng.integers(4, 17)))
        tables.append(sf.Table({"text": [" ".join(words[j] for j in picked)]}))
    return tables


if __name__ == "__main__":
    from examples.pipelines.demo import main

    main("translation")
