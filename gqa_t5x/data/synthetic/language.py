"""A synthetic language, a second language to translate it into, and the texts of the suite.

Everything here is generated from integer seeds with Python's `random.Random` (whose streams are
stable across Python versions), so the suite needs no third-party text and is identical everywhere.

Source language:
  * lowercase pseudo-words made of CV / CVC syllables; frequent words are shorter (Zipf's law of
    abbreviation) and words are drawn with Zipfian frequencies;
  * capitalised entity names, attribute names each with their own set of values, relation verbs;
  * facts: `Entity attribute value.` and `Entity relation Entity.`;
  * clauses: `DET [ADJ] NOUN [AUX] VERB DET [ADJ] NOUN [PREP DET [ADJ] NOUN].` in SVO order, with
    number marked on the determiner and tense by an auxiliary; entities may replace noun phrases.

Target language (for translation only), with a disjoint lexicon built from other syllables:
  * SOV order: subject, then the prepositional phrase turned postpositional, then object, verb;
  * adjectives follow the noun and agree in number; nouns carry number and case suffixes;
  * definiteness is an article, tense a verb suffix, and the verb agrees with a plural subject.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import random
from collections.abc import Sequence

_SRC_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_SRC_VOWELS = ("a", "e", "i", "o", "u")
_SRC_CODAS = ("", "", "", "l", "m", "n", "r", "s")
_TGT_ONSETS = ("h", "j", "k", "q", "w", "x", "y", "c", "sh", "th", "ch")
_TGT_VOWELS = ("a", "e", "i", "o", "u", "ai", "au", "ei")
_TGT_CODAS = ("", "", "", "k", "x", "q")
_TENSES = ("present", "past", "future")
_CASES = ("nom", "acc", "obl")


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """Sizes of the lexicon. About 3,000 source words and 2,000 target words by default."""

    seed: int = 0
    num_entities: int = 400
    num_attributes: int = 12
    values_per_attribute: int = 16
    num_relations: int = 16
    num_nouns: int = 1200
    num_verbs: int = 500
    num_adjectives: int = 500
    num_prepositions: int = 8
    zipf_exponent: float = 1.1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name not in ("seed", "zipf_exponent") and value < 1:
                raise ValueError(f"LanguageConfig.{field.name}={value} must be >= 1")
        if self.num_entities < 2:
            raise ValueError(f"LanguageConfig.num_entities={self.num_entities} must be >= 2")


class _WordMaker:
    """Draws pseudo-words from a syllable inventory, never repeating a word in `used`."""

    def __init__(self, onsets, vowels, codas, rng: random.Random, used: set[str]):
        self._syllables = [o + v + c for o, v, c in itertools.product(onsets, vowels, codas)]
        self._syllables = sorted(set(self._syllables))
        self._rng = rng
        self._used = used

    def syllable(self) -> str:
        return self._rng.choice(self._syllables)

    def distinct_syllables(self, n: int) -> list[str]:
        return self._rng.sample(self._syllables, n)

    def word(self, num_syllables: int) -> str:
        for _ in range(1000):
            w = "".join(self.syllable() for _ in range(num_syllables))
            if w not in self._used:
                self._used.add(w)
                return w
        raise ValueError(f"could not draw a new {num_syllables}-syllable word: lexicon too large")

    def lexicon(self, n: int) -> list[str]:
        """n words, the frequent (low-rank) ones shorter."""
        return [self.word(1 if r < 0.05 * n else 2 if r < 0.5 * n else 3) for r in range(n)]


class _Zipf:
    """Samples items with probability proportional to 1 / (rank + 1) ** exponent."""

    def __init__(self, items: Sequence, exponent: float):
        self.items = list(items)
        self._cum = list(itertools.accumulate(1.0 / (r + 1) ** exponent
                                              for r in range(len(items))))

    def __call__(self, rng: random.Random):
        i = bisect.bisect_right(self._cum, rng.random() * self._cum[-1])
        return self.items[min(i, len(self.items) - 1)]


@dataclasses.dataclass(frozen=True)
class NounPhrase:
    """A noun phrase: an entity (`entity` set) or a determiner, optional adjective and noun."""

    entity: str | None = None
    noun: str | None = None
    adjective: str | None = None
    definite: bool = True
    plural: bool = False


@dataclasses.dataclass(frozen=True)
class Clause:
    """One transitive clause with an optional prepositional phrase, in source-language lemmas."""

    subject: NounPhrase
    verb: str
    tense: str
    obj: NounPhrase
    preposition: str | None = None
    oblique: NounPhrase | None = None


class Language:
    """The lexicons of both languages, the grammar, and the translation between them."""

    def __init__(self, config: LanguageConfig):
        self.config = config
        rng = random.Random(f"gqa_t5x.synthetic.lexicon.{config.seed}")
        used: set[str] = set()
        src = _WordMaker(_SRC_ONSETS, _SRC_VOWELS, _SRC_CODAS, rng, used)
        tgt = _WordMaker(_TGT_ONSETS, _TGT_VOWELS, _TGT_CODAS, rng, used)
        c = config
        # Source function words.
        self.determiners = {(d, p): src.word(1) for d in (True, False) for p in (False, True)}
        self.auxiliaries = {"present": None, "past": src.word(1), "future": src.word(1)}
        self.prepositions = [src.word(1) for _ in range(c.num_prepositions)]
        # Source content words.
        self.entities = [src.word(2 + (i % 2)).capitalize() for i in range(c.num_entities)]
        self.attributes = [src.word(2) for _ in range(c.num_attributes)]
        self.values = [[src.word(2) for _ in range(c.values_per_attribute)]
                       for _ in range(c.num_attributes)]
        self.relations = [src.word(2) for _ in range(c.num_relations)]
        self.nouns = src.lexicon(c.num_nouns)
        self.verbs = src.lexicon(c.num_verbs)
        self.adjectives = src.lexicon(c.num_adjectives)
        # Target lexicon: a bijection on content words, plus affixes and function words.
        self.target_words = {}
        for words in (self.nouns, self.verbs, self.adjectives, self.prepositions):
            for w, t in zip(words, tgt.lexicon(len(words))):
                self.target_words[w] = t
        self.target_article = tgt.word(1)
        # Distinct affixes, so that each morpheme is recoverable.
        affixes = tgt.distinct_syllables(3 + len(_CASES) + len(_TENSES))
        self.plural_suffix, self.adjective_plural_suffix, self.agreement_suffix = affixes[:3]
        self.case_suffixes = dict(zip(_CASES, affixes[3:3 + len(_CASES)]))
        self.tense_suffixes = dict(zip(_TENSES, affixes[3 + len(_CASES):]))
        z = c.zipf_exponent
        self.sample_noun = _Zipf(self.nouns, z)
        self.sample_verb = _Zipf(self.verbs, z)
        self.sample_adjective = _Zipf(self.adjectives, z)
        self.sample_preposition = _Zipf(self.prepositions, z)

    # ---------------------------------------------------------------- clauses
    def random_noun_phrase(self, rng: random.Random, entities: Sequence[str] = (),
                           entity_rate: float = 0.0) -> NounPhrase:
        if entities and rng.random() < entity_rate:
            return NounPhrase(entity=rng.choice(entities))
        adjective = self.sample_adjective(rng) if rng.random() < 0.4 else None
        return NounPhrase(noun=self.sample_noun(rng), adjective=adjective,
                          definite=rng.random() < 0.6, plural=rng.random() < 0.3)

    def random_clause(self, rng: random.Random, entities: Sequence[str] = (),
                      entity_rate: float = 0.2, pp_rate: float = 0.4) -> Clause:
        """A clause whose noun phrases are entities from `entities` with prob. `entity_rate`."""
        subject = self.random_noun_phrase(rng, entities, entity_rate)
        verb = self.sample_verb(rng)
        tense = rng.choice(_TENSES)
        obj = self.random_noun_phrase(rng, entities, entity_rate)
        if rng.random() < pp_rate:
            return Clause(subject, verb, tense, obj, self.sample_preposition(rng),
                          self.random_noun_phrase(rng, entities, entity_rate))
        return Clause(subject, verb, tense, obj)

    def _source_np(self, np_: NounPhrase) -> list[str]:
        if np_.entity is not None:
            return [np_.entity]
        words = [self.determiners[(np_.definite, np_.plural)]]
        if np_.adjective is not None:
            words.append(np_.adjective)
        return words + [np_.noun]

    def _target_np(self, np_: NounPhrase, case: str) -> list[str]:
        suffix = self.case_suffixes[case]
        if np_.entity is not None:
            return [np_.entity + suffix]
        words = [self.target_article] if np_.definite else []
        number = self.plural_suffix if np_.plural else ""
        words.append(self.target_words[np_.noun] + number + suffix)
        if np_.adjective is not None:
            adj_number = self.adjective_plural_suffix if np_.plural else ""
            words.append(self.target_words[np_.adjective] + adj_number)
        return words

    def render_source(self, clause: Clause) -> str:
        """SVO: subject [auxiliary] verb object [preposition noun-phrase]."""
        words = self._source_np(clause.subject)
        if self.auxiliaries[clause.tense] is not None:
            words.append(self.auxiliaries[clause.tense])
        words.append(clause.verb)
        words += self._source_np(clause.obj)
        if clause.preposition is not None:
            words += [clause.preposition] + self._source_np(clause.oblique)
        return " ".join(words) + "."

    def render_target(self, clause: Clause) -> str:
        """SOV: subject-NOM [oblique-OBL postposition] object-ACC verb-TENSE[-AGR]."""
        words = self._target_np(clause.subject, "nom")
        if clause.preposition is not None:
            words += self._target_np(clause.oblique, "obl")
            words.append(self.target_words[clause.preposition])
        words += self._target_np(clause.obj, "acc")
        agreement = self.agreement_suffix if clause.subject.plural else ""
        words.append(self.target_words[clause.verb] + self.tense_suffixes[clause.tense]
                     + agreement)
        return " ".join(words) + "."

    # ------------------------------------------------------------------ facts
    def attribute_fact(self, entity: str, attribute: int, value: int) -> str:
        return f"{entity} {self.attributes[attribute]} {self.values[attribute][value]}."

    def relation_fact(self, entity: str, relation: int, other: str) -> str:
        return f"{entity} {self.relations[relation]} {other}."


@functools.lru_cache(maxsize=8)
def get_language(config: LanguageConfig) -> Language:
    """The (cached) language of `config`."""
    return Language(config)


# --------------------------------------------------------------------------- texts
def document(lang: Language, rng: random.Random, num_entities: int,
             facts_per_entity: tuple[int, int], num_clauses: int,
             ) -> tuple[str, list[tuple[str | None, str]]]:
    """A document about several entities: (title, [(subject entity or None, sentence)]).

    The first entity is the title. Each entity gets between `facts_per_entity[0]` and
    `facts_per_entity[1]` facts (distinct attributes, or relations to other entities of the
    document, which may be the title: facts *about* an entity are those it is the subject of).
    Facts and `num_clauses` clauses are shuffled together.
    """
    if num_entities > len(lang.entities):
        raise ValueError(f"num_entities={num_entities} exceeds the lexicon's "
                         f"{len(lang.entities)} entities")
    lo, hi = facts_per_entity
    if not 0 <= lo <= hi or hi > lang.config.num_attributes:
        raise ValueError(f"facts_per_entity={facts_per_entity} must satisfy 0 <= lo <= hi <= "
                         f"num_attributes={lang.config.num_attributes}")
    entities = rng.sample(lang.entities, num_entities)
    sentences: list[tuple[str | None, str]] = []
    for entity in entities:
        n = rng.randint(lo, hi)
        attributes = rng.sample(range(lang.config.num_attributes), n)
        for a in attributes:
            others = [e for e in entities if e != entity]
            if others and rng.random() < 0.25:
                fact = lang.relation_fact(entity, rng.randrange(lang.config.num_relations),
                                          rng.choice(others))
            else:
                fact = lang.attribute_fact(entity, a,
                                           rng.randrange(lang.config.values_per_attribute))
            sentences.append((entity, fact))
    for _ in range(num_clauses):
        sentences.append((None, lang.render_source(lang.random_clause(rng, entities))))
    rng.shuffle(sentences)
    return entities[0], sentences


def summarize_example(lang: Language, rng: random.Random, num_entities: int,
                      facts_per_entity: tuple[int, int], num_clauses: int) -> dict[str, str]:
    """`summarize: TITLE: sentences...` -> the facts whose subject is TITLE, in document order."""
    title, sentences = document(lang, rng, num_entities, facts_per_entity, num_clauses)
    body = " ".join(s for _, s in sentences)
    summary = " ".join(s for subject, s in sentences if subject == title)
    return {"inputs": f"summarize: {title}: {body}", "targets": summary}


def qa_example(lang: Language, rng: random.Random, num_entities: int, num_attributes: int,
               num_clauses: int) -> dict:
    """`question: E attr? context: facts...` -> the value of attribute `attr` of entity `E`.

    The context holds a full grid of facts: each of `num_entities` entities has a value for each
    of the same `num_attributes` attributes, shuffled (with `num_clauses` clauses mixed in). With
    one entity the attribute is the key; with several, neither the entity nor the attribute
    alone identifies the answer.
    """
    if num_entities > len(lang.entities) or num_attributes > lang.config.num_attributes:
        raise ValueError(f"qa needs num_entities={num_entities} <= {len(lang.entities)} and "
                         f"num_attributes={num_attributes} <= {lang.config.num_attributes}")
    entities = rng.sample(lang.entities, num_entities)
    attributes = rng.sample(range(lang.config.num_attributes), num_attributes)
    facts = {}
    for e in entities:
        for a in attributes:
            facts[(e, a)] = rng.randrange(lang.config.values_per_attribute)
    sentences = [lang.attribute_fact(e, a, v) for (e, a), v in facts.items()]
    sentences += [lang.render_source(lang.random_clause(rng, entities))
                  for _ in range(num_clauses)]
    rng.shuffle(sentences)
    entity, attribute = rng.choice(sorted(facts))
    answer = lang.values[attribute][facts[(entity, attribute)]]
    question = f"{entity} {lang.attributes[attribute]}?"
    return {"inputs": f"question: {question} context: {' '.join(sentences)}",
            "targets": answer, "answers": [answer]}


def translate_example(lang: Language, rng: random.Random, entity_rate: float = 0.15,
                      pp_rate: float = 0.4) -> dict[str, str]:
    """`translate: source clause` -> its target-language rendering."""
    entities = rng.sample(lang.entities, min(3, len(lang.entities)))
    clause = lang.random_clause(rng, entities, entity_rate, pp_rate)
    return {"inputs": f"translate: {lang.render_source(clause)}",
            "targets": lang.render_target(clause)}


def corpus_document(lang: Language, rng: random.Random, num_entities: int,
                    facts_per_entity: tuple[int, int], num_clauses: int,
                    target_language_rate: float) -> str:
    """A pre-training document: a source document, or with prob. `target_language_rate` a run of
    target-language clauses (so that the uptraining corpus covers both languages)."""
    if rng.random() < target_language_rate:
        entities = rng.sample(lang.entities, num_entities)
        n = num_clauses + num_entities * sum(facts_per_entity) // 2
        return " ".join(lang.render_target(lang.random_clause(rng, entities)) for _ in range(n))
    title, sentences = document(lang, rng, num_entities, facts_per_entity, num_clauses)
    return f"{title}: " + " ".join(s for _, s in sentences)
