"""Tiny random models built in code (PEFT's habit): real architectures, seconds to build, no downloads."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from backbone import BackboneConfig

CORPUS = [
    "the capital of france is paris and the capital of italy is rome",
    "covid spreads through droplets and the incubation period is five days",
    "the company revenue was 42 million dollars in 2019 and 51 million in 2020",
    "ross and rachel were on a break said ross to joey in the coffee house",
    "passages questions answers retrieval generator encoder adapter domain news finance",
    "what who when where which how many much is was are were of in on at to a an",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 zero one two three four five six seven eight nine",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<reconstruct>"]


def _word_tokenizer() -> Tokenizer:
    """A WordPiece tokenizer over the corpus' words and characters, with ids in a fixed order.

    Trained by `WordPieceTrainer`, the ids came out in a different order in every process (the trainer's hash
    maps), so the tiny models, and every output asserted on, changed from one test run to the next."""
    words = sorted({word for line in CORPUS for word in line.split()})
    characters = sorted({char for word in words for char in word})
    pieces = [*SPECIALS, *characters, *(f"##{char}" for char in characters), *words]
    tokenizer = Tokenizer(
        models.WordPiece({piece: i for i, piece in enumerate(dict.fromkeys(pieces))}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _save_tokenizer(directory: Path, encoder: bool) -> int:
    raw = _word_tokenizer()
    if encoder:
        from tokenizers.processors import TemplateProcessing

        cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
        raw.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
        )
    tok.save_pretrained(directory)
    return raw.get_vocab_size()


def build_bert(directory: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    vocab = _save_tokenizer(directory, encoder=True)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


def build_dpr(directory: Path, role: str, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    vocab = _save_tokenizer(directory, encoder=True)
    config = DPRConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    cls = DPRQuestionEncoder if role == "question" else DPRContextEncoder
    cls(config).save_pretrained(directory)
    return directory


def build_llama(directory: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    vocab = _save_tokenizer(directory, encoder=False)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=5,
        eos_token_id=6,
        pad_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )  # large enough that logits can become confident
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def build_bart(directory: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    vocab = _save_tokenizer(directory, encoder=False)
    config = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=5,
        eos_token_id=6,
        decoder_start_token_id=6,
        forced_eos_token_id=None,
        init_std=0.2,
    )
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def tiny_backbone_config(
    root: Path, generator: str = "llama", encoder: str = "bert", **overrides
) -> BackboneConfig:
    """Builds (once per root) tiny random encoders and a generator and returns a config pointing at them."""
    root.mkdir(parents=True, exist_ok=True)

    def once(name, build):
        path = root / name
        if not (path / "config.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            build(path)
        return str(path)

    if encoder == "dpr":
        question = once("dpr-question", lambda p: build_dpr(p, "question", seed=1))
        passage = once("dpr-passage", lambda p: build_dpr(p, "passage", seed=2))
    else:
        question = passage = once("bert", build_bert)
    generator_path = once(generator, build_llama if generator == "llama" else build_bart)
    settings = dict(
        question_encoder=question,
        passage_encoder=passage,
        generator=generator_path,
        cache_dir=root / "cache",
        dtype="float32",
        max_passage_tokens=48,
        max_answer_tokens=12,
    )
    settings.update(overrides)
    return BackboneConfig(**settings)
