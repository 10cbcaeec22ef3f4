"""Stage 2 of Flamingo's recipe: a language model pretrained on text alone, before any image is seen.

No released LM can be downloaded here, so a small Llama learns the synthetic world's language: captions of
scenes and clips, "Question: ... Answer: ..." lines (the format stage 3 uses), runs of several captions,
fast-binding sentences ("This is a red circle bliket.") and runs of words said twice, from which it learns
to copy. Copying and binding in text are what stage 3's few-shot binding from images is built on: a
frozen LM without them leaves the bridges nothing to steer (`binding_accuracy` measures it).

Its tokenizer is trained on the same text with the `tokenizers` library: byte-level BPE, so any string --
nonsense words included -- still encodes, and `<|endoftext|>` separates documents. Saved with Hugging
Face `save_pretrained` (safetensors), which is what `Flamingo.from_backbones` and `build_miniature` take.

Every document is a pure function of (seed, stream, index): training reads stream 0, evaluation stream 1.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from training.evaluate import WORD_SETS, rename_words, wide_nonsense_words
from training.optim import adamw_warmup_cosine, check_optimisation, clip_gradients
from training.synthetic import (
    BINDING_CATEGORIES,
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SUPPORT_TEXT,
    BindingEpisode,
    Clip,
    Scene,
    make_binding_episode,
    make_clip,
    make_scene,
    nonsense_words,
    pick,
)

END_OF_TEXT = "<|endoftext|>"
TRAIN_STREAM, EVAL_STREAM, TOKENIZER_STREAM = 0, 1, 2
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DocumentMix:
    """How often each kind of document is drawn (relative weights). The default mix is the one whose LM
    binds in text (`binding_accuracy` 0.99 where equal weights left it at chance): copying is learnt
    from the repeated runs, and which word to copy from the named-binding sentences."""

    caption: float = 1.0            # one caption of a scene or clip
    qa: float = 1.0                 # "Question: ... Answer: ..."
    captions: float = 1.0           # a run of 2..max_captions captions
    binding: float = 1.0            # "This is a bliket." sentences: a word seen before comes back
    named_binding: float = 2.0      # "This is a red circle bliket. ...": the object before the word picks it
    repeat: float = 4.0             # a run of words said twice: the copying that binding rests on
    # "a red circle at the top. Question: Is there a red shape? Answer: yes": a question answered from the
    # caption before it. Last, so that at 0 the other kinds are drawn exactly as before (numpy's choice).
    answered: float = 0.0
    # "qzuv ek shoobmir. qzuv ek shoobmir.": runs of random letter strings said twice, so copying is learnt for
    # every letter and not only for the nonsense words' (docs/binding-words.md). Last, for the same reason.
    strings: float = 0.0

    def __post_init__(self) -> None:
        for name in DOCUMENT_KINDS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be non-negative, got {getattr(self, name)}")
        if not any(getattr(self, name) for name in DOCUMENT_KINDS):
            raise ValueError(f"{' / '.join(DOCUMENT_KINDS)}: must not all be 0")

    def probabilities(self) -> np.ndarray:
        weights = np.array([getattr(self, name) for name in DOCUMENT_KINDS], dtype=float)
        return weights / weights.sum()


DOCUMENT_KINDS = tuple(f.name for f in fields(DocumentMix))


@dataclass(frozen=True)
class LMPretrainConfig:
    """A text-only run: tokenizer and model sizes, data and optimisation (defaults: the stage-2 miniature)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    vocab_size: int = 512                 # BPE target; the world's text needs far fewer words
    tokenizer_documents: int = 3000
    max_length: int = 128                 # tokens per training row (documents are cut at the end)
    max_captions: int = 4                 # longest run of captions in one document
    documents: DocumentMix = field(default_factory=DocumentMix)
    # named-binding episodes show each word 1..binding_shots times. The LM binds only as far into a
    # prompt as it was trained to: with 3 (documents under ~100 tokens) the bridged model fell from 0.89
    # at 4 shots per word to 0.56 at 8, where the prompt runs to ~150 tokens
    binding_shots: int = 3
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 8          # 8 heads of 16: with 4 query heads on 2 key-value heads the
    num_key_value_heads: int = 8          # same run stayed at chance on text binding (0.49 against 0.99)
    max_position_embeddings: int = 1024   # stage 3 sequences run to a few hundred tokens

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "tokenizer_documents", "max_captions", "binding_shots", "hidden_size",
                     "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        check_optimisation(self)
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size: must hold the 256 bytes and {END_OF_TEXT}, got {self.vocab_size}")
        if not 8 <= self.max_length <= self.max_position_embeddings:
            raise ValueError("max_length: must be in 8..max_position_embeddings")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide into heads, and heads into key-value heads")


# --- text ----------------------------------------------------------------------------------------


def world_document(rng: np.random.Generator, config: LMPretrainConfig) -> str:
    """One document of the world's text, of a kind drawn by `config.documents`' weights."""
    kind = DOCUMENT_KINDS[int(rng.choice(len(DOCUMENT_KINDS), p=config.documents.probabilities()))]
    if kind == "caption":
        return _sample(rng).caption()
    if kind == "qa":
        return _asked(rng, _sample(rng))
    if kind == "captions":
        return " ".join(_sample(rng).caption() for _ in range(int(rng.integers(2, config.max_captions + 1))))
    if kind == "binding":
        episode = make_binding_episode(rng, ways=int(rng.integers(1, 4)))
        return " ".join([*episode.support_texts, SUPPORT_TEXT.format(word=episode.answer)])
    if kind == "named_binding":
        return named_binding(rng, config.binding_shots)
    if kind == "answered":
        return answered_question(rng)
    if kind == "strings":
        return repeated_strings(rng)
    return repeated_words(rng)


def answered_question(rng: np.random.Generator) -> str:
    """'a red circle at the top. Question: Is there a red shape? Answer: yes': a scene's or clip's caption,
    then one of its questions. In text alone a question's answer is a guess; here the LM learns to carry
    what the question names to 'Answer:' and look it up in what came before, which the bridges can reuse
    with an image in the caption's place (as named_binding does for binding)."""
    sample = _sample(rng)
    return f"{sample.caption()} {_asked(rng, sample)}"


def _asked(rng: np.random.Generator, sample: Scene | Clip) -> str:
    """'Question: ... Answer: ...' for one of `sample`'s questions, picked at random."""
    questions = sample.qa()
    qa = questions[int(rng.integers(len(questions)))]
    return f"{qa.prompt} {qa.answer}"


def named_binding(rng: np.random.Generator, max_shots: int = 3) -> str:
    """'This is a red circle bliket. This is a blue star dovax. This is a red circle bliket.': a binding
    episode in words, where each word follows the object that names it. Stage 3's support chunks read
    '<image>This is a bliket.', so the bridges only have to make the image after 'This is a' look, to
    the LM, like the words 'red circle'; the LM already knows what to copy from there."""
    return named_binding_text(named_binding_episode(rng, max_shots))


def named_binding_episode(rng: np.random.Generator, max_shots: int = 3) -> BindingEpisode:
    category = pick(rng, BINDING_CATEGORIES)
    return make_binding_episode(rng, ways=int(rng.integers(2, 4)), shots=int(rng.integers(1, max_shots + 1)),
                                category=category)


def named_binding_text(episode: BindingEpisode) -> str:
    scenes = [*episode.support, episode.query]
    words = [*episode.support_words, episode.answer]
    return " ".join(f"This is a {scene.objects[0].name} {word}." for scene, word in zip(scenes, words))


def repeated_words(rng: np.random.Generator) -> str:
    """'bliket red dovax four. bliket red dovax four.': 4..12 words, nonsense and the world's, said twice.
    The second half is predictable only by finding the same words earlier and copying what came next,
    which is how induction heads form (Olsson et al. 2022); the world's templated text alone never made
    the LM learn it, and without it no binding, in text or from images, rises above chance."""
    vocabulary = (*COLOURS, *SHAPES, *NUMBER_WORDS[1:6])
    words = [nonsense_words(rng, 1)[0] if rng.random() < 0.5 else pick(rng, vocabulary)
             for _ in range(int(rng.integers(4, 13)))]
    return _said_twice(words)


def repeated_strings(rng: np.random.Generator) -> str:
    """'qzuv ek shoobmir. qzuv ek shoobmir.': 4..12 strings of 1..10 random lowercase letters, said twice.
    `repeated_words` teaches copying only on the tokens of the world's words and of training's nonsense
    words, and the LM then copies only those: a word with other letters binds near chance even in text."""
    strings = ["".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(1, 11))))
               for _ in range(int(rng.integers(4, 13)))]
    return _said_twice(strings)


def _said_twice(words: list[str]) -> str:
    """'a b c. a b c.': the run, then the same run again."""
    run = " ".join(words)
    return f"{run}. {run}."


def _sample(rng: np.random.Generator):
    return make_clip(rng) if rng.random() < 0.25 else make_scene(rng)


def documents(config: LMPretrainConfig, index: int, count: int, stream: int = TRAIN_STREAM) -> list[str]:
    """`count` documents: a pure function of (seed, stream, index)."""
    rng = np.random.default_rng((config.seed, stream, index))
    return [world_document(rng, config) for _ in range(count)]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with `<|endoftext|>` as its beginning- and end-of-text token.
    No pad token: `Flamingo.from_backbones` adds one along with its media tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of `text<|endoftext|>` with labels; padding (and only padding) is ignored, so
    the model learns where a document ends."""
    eos = tokenizer.eos_token_id
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length - 1] + [eos] for text in texts]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), eos, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- model, training and evaluation --------------------------------------------------------------


def build_lm(config: LMPretrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised Llama sized by `config`, its vocabulary by `tokenizer`; seeded without
    touching the global RNG. Untied embeddings, like the tiny-random preset's LM."""
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AutoModelForCausalLM.from_config(lm_config)


def pretrain_lm(config: LMPretrainConfig, log_every: int = 0,
                tokenizer: PreTrainedTokenizerFast | None = None,
                lm: PreTrainedModel | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Train a tokenizer (unless given) and an LM (a fresh one unless given) for `config.steps` steps of
    AdamW with warm-up and cosine decay; prints the loss every `log_every` steps (0: silent)."""
    if tokenizer is None:
        tokenizer = train_tokenizer(documents(config, 0, config.tokenizer_documents, TOKENIZER_STREAM),
                                    config.vocab_size)
    lm = lm if lm is not None else build_lm(config, tokenizer)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer, scheduler = adamw_warmup_cosine(params, config.lr, config.weight_decay, config.warmup_steps,
                                               config.steps, config.min_lr_ratio)
    lm.train()
    with torch.random.fork_rng(devices=[]):   # dropout, if configured, draws from a seeded RNG
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            batch = encode_batch(tokenizer, documents(config, step, config.batch_size), config.max_length)
            loss = lm(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
                print(f"lm step {step + 1:>5}/{config.steps}  loss {loss.item():.4f}", flush=True)
    return lm.eval(), tokenizer


@torch.no_grad()
def perplexity(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
               max_length: int = 128, batch_size: int = 32) -> float:
    """exp(mean next-token loss) over every predicted token of `texts` (each ending in `<|endoftext|>`).
    A random model scores about its vocabulary size; a model that knew the text exactly scores 1."""
    lm.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = encode_batch(tokenizer, texts[start:start + batch_size], max_length)
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(losses)
        count += int((targets != IGNORE_INDEX).sum())
    return float(np.exp(total / count))


@torch.no_grad()
def binding_accuracy(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LMPretrainConfig,
                     episodes: int = 200, words: str = "train") -> float:
    """How often the LM, given a held-out named-binding episode up to its last word, puts the right word
    above the episode's other words (chance about 0.42 over 2..3 words). Stage 3's few-shot binding
    from images needs this near 1 first: the frozen LM does the matching and copying there too.

    `words`: "train" keeps training's nonsense words; "wide" renames the same episodes' words with the
    evaluation's held-out ones (`training.evaluate.wide_nonsense_words`). Few-shot binding from images with
    such words cannot beat what the LM does with them in text."""
    if words not in WORD_SETS:
        raise ValueError(f"words: must be {' or '.join(WORD_SETS)}, got {words!r}")
    lm.eval()
    rng = np.random.default_rng((config.seed, EVAL_STREAM, 1))
    word_rng = np.random.default_rng((config.seed, EVAL_STREAM, 3))
    correct = 0
    for _ in range(episodes):
        episode = named_binding_episode(rng, config.binding_shots)
        if words == "wide":
            episode = rename_words(episode, wide_nonsense_words(word_rng, len(episode.words)))
        prompt = named_binding_text(episode).removesuffix(f" {episode.answer}.")   # the text, less its last word
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for word in episode.words:
            word_ids = tokenizer(f" {word}.", add_special_tokens=False)["input_ids"]
            logits = lm(input_ids=torch.tensor([prompt_ids + word_ids])).logits[0, len(prompt_ids) - 1:-1]
            scores.append(float(logits.float().log_softmax(-1).gather(1, torch.tensor(word_ids)[:, None]).sum()))
        correct += episode.words[int(np.argmax(scores))] == episode.answer
    return correct / episodes


# What `answered_accuracy` asks: the questions that name one object of a scene and ask one of its attributes.
ANSWERED_ATTRIBUTES = ("colour", "shape", "size", "position")


@torch.no_grad()
def answered_accuracy(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LMPretrainConfig,
                      questions: int = 200) -> dict[str, float]:
    """How often the LM, given a held-out caption of 2-3 objects and then a question about one of them ('a
    large red circle at the top and a small blue square on the left. Question: What colour is the square?
    Answer:'), answers it word for word (greedy), per attribute of ANSWERED_ATTRIBUTES and overall.

    Stage 3 asks the same of the bridged model with the image in the caption's place. An LM that cannot look
    the answer up in words leaves the cross-attention to write every answer itself (docs/several-objects.md).
    """
    lm.eval()
    rng = np.random.default_rng((config.seed, EVAL_STREAM, 2))
    right: dict[str, list[bool]] = {attribute: [] for attribute in ANSWERED_ATTRIBUTES}
    for _ in range(questions):
        scene = make_scene(rng, max_objects=3)
        while len(scene.objects) < 2:
            scene = make_scene(rng, max_objects=3)
        asked = [qa for qa in scene.qa() if qa.attribute in right]
        qa = asked[int(rng.integers(len(asked)))]
        ids = tokenizer(f"{scene.caption()} {qa.prompt}", return_tensors="pt",
                        add_special_tokens=False)["input_ids"]
        out = lm.generate(ids, max_new_tokens=8, do_sample=False,  # type: ignore[operator]  # HF's stubs
                          pad_token_id=tokenizer.eos_token_id)
        answer = str(tokenizer.decode(out[0, ids.shape[1]:])).split(END_OF_TEXT)[0].strip()
        right[qa.attribute].append(answer == qa.answer)
    scores = {attribute: float(np.mean(r)) for attribute, r in right.items() if r}
    return {**scores, "all": float(np.mean([x for r in right.values() for x in r]))}


def held_out_texts(config: LMPretrainConfig, count: int = 256) -> list[str]:
    """Documents from the evaluation stream, never seen in training or by the tokenizer trainer."""
    return documents(config, 0, count, EVAL_STREAM)


# --- saving --------------------------------------------------------------------------------------


def save_lm(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """LM and tokenizer side by side with Hugging Face `save_pretrained` (safetensors + JSON)."""
    directory = Path(directory)
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_lm(directory: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return AutoModelForCausalLM.from_pretrained(str(directory)).eval(), AutoTokenizer.from_pretrained(str(directory))
