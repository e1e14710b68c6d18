"""runtime/tokenizer.py + chat_template.py against transformers (encode/decode and apply_chat_template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from vptq_mlc.runtime.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from vptq_mlc.runtime.tokenizer import Tokenizer
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

TEXTS = [
    "Hello world! héllo wörld",
    "你好世界, emoji 🙂🚀 and ünïcödé",
    "  leading spaces and\nnew lines\t tabs",
    "The quick brown fox",
]


def write_byte_fallback_tokenizer(out: Path) -> None:
    """A Llama/SentencePiece-style tokenizer: Metaspace, byte fallback <0xNN>, Strip decoder; char-level vocab."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTok

    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += ["▁t", "he", "▁the", "▁T", "▁q"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "T"), ("▁", "q")]
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tok_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":  # the synthetic checkpoint's GPT-2 style BPE (ASCII corpus: bytes for the rest)
        d = make_synthetic_checkpoint(d / "ckpt", vocab_size=400, hidden_size=16, intermediate_size=16, num_layers=1)
    else:
        write_byte_fallback_tokenizer(d)
    return d


def test_encode_decode_match_transformers(tok_dir: Path) -> None:
    ours, ref = Tokenizer(tok_dir), PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


def test_stream_decode_equals_full_decode(tok_dir: Path) -> None:
    tok = Tokenizer(tok_dir)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        stream = tok.stream()
        deltas = [stream.put(i) for i in ids]
        deltas.append(stream.flush())
        assert "".join(deltas) == tok.decode(ids), deltas
        assert not any("\ufffd" in d for d in deltas)  # multi-byte characters are never split
        assert sum(1 for d in deltas if d) > 1  # it really streams


def test_stream_skips_special_tokens(tok_dir: Path) -> None:
    tok = Tokenizer(tok_dir)
    eos = tok.token_to_id(tok.special_tokens["eos_token"])
    ids = tok.encode("héllo", add_special_tokens=False) + [eos] + tok.encode(" wörld", add_special_tokens=False)
    stream = tok.stream()
    text = "".join(stream.put(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids) and tok.special_tokens["eos_token"] not in text
    raw = tok.stream(skip_special_tokens=False)
    assert tok.special_tokens["eos_token"] in "".join(raw.put(i) for i in ids) + raw.flush()


def reference_stream_deltas(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    """The two-window incremental detokenizer (Hugging Face text-generation-inference's), every id in its window."""
    out, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        prefix_text, full_text = tok.decode(ids[prefix:read], skip), tok.decode(ids[prefix:n], skip)
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            out.append("")
        else:
            out.append(full_text[len(prefix_text) :])
            prefix, read = read, n
    return out + [tok.decode(ids[prefix:], skip)[len(tok.decode(ids[prefix:read], skip)) :]]


def test_stream_special_tokens_stay_out_of_the_window(tok_dir: Path) -> None:
    """Ids that decode to nothing (special tokens when skipped, ids past the vocabulary) give the reference
    algorithm's deltas, step by step, and a long run of them does not widen what each step decodes."""
    tok = Tokenizer(tok_dir)
    specials = sorted(tok.special_ids)
    rng = np.random.default_rng(4)
    text_ids = tok.encode("".join(TEXTS), add_special_tokens=False)
    for _ in range(20):
        ids = []
        for t in text_ids:
            while rng.random() < 0.3:
                ids.append(int(rng.choice(specials)) if rng.random() < 0.8 else tok.vocab_size + int(rng.integers(9)))
            ids.append(t)
        for skip in (True, False):
            stream = tok.stream(skip_special_tokens=skip)
            assert [stream.put(i) for i in ids] + [stream.flush()] == reference_stream_deltas(tok, ids, skip)
    stream, widths = tok.stream(), []
    decode = tok.decode
    tok.decode = lambda ids, skip=True: widths.append(len(ids)) or decode(ids, skip)  # type: ignore[method-assign]
    text = "".join(stream.put(i) for i in text_ids[:3] + [specials[0]] * 500 + text_ids[3:6])
    assert text + stream.flush() == decode(text_ids[:6]) and max(widths) <= 6


def test_vocab_size_is_read_once(tok_dir: Path) -> None:
    """`tokenizers` rebuilds its vocabulary map on every get_vocab_size call (milliseconds at real vocabularies):
    the size is read at load, so a request's stream decoder does not pay it; it equals transformers' len()."""
    tok = Tokenizer(tok_dir)
    assert tok.vocab_size == len(PreTrainedTokenizerFast.from_pretrained(str(tok_dir)))

    class Counting:
        def __init__(self, inner: object) -> None:
            self.inner, self.calls = inner, 0

        def get_vocab_size(self, *a: object, **k: object) -> int:
            self.calls += 1
            return self.inner.get_vocab_size(*a, **k)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    tok._tok = counting = Counting(tok._tok)
    for _ in range(3):
        tok.stream().put(5)
    assert counting.calls == 0


def test_missing_tokenizer_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(Exception, match="no tokenizer.json.*tokenizer.model"):
        Tokenizer(tmp_path)


# ---- chat templates --------------------------------------------------------------------------------

LLAMA3_LIKE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = "Today is " + strftime_now("%Y") + "." %}{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools is not none %}{{- '\\nTools: ' + tools | tojson(indent=2) }}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('Unknown role ' + message['role']) }}{% endif %}
    {%- if loop.index > 6 %}{% break %}{% endif %}
    {% if message['role'] == 'assistant' %}{% generation %}{{ '<|im_start|>assistant\\n' + message['content'] | trim + eos_token }}{% endgeneration %}
    {% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' }}
    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
ALTERNATING = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there! 你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": f"turn {i}"} if i % 2 == 0 else {"role": "assistant", "content": f"ok {i}"}
     for i in range(9)],
]


def _with_template(tok_dir: Path, out: Path, template: object) -> Path:
    out.mkdir()
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("template", [LLAMA3_LIKE, ALTERNATING])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tok_dir: Path, tmp_path: Path, template: str, gen_prompt: bool) -> None:
    d = _with_template(tok_dir, tmp_path / "m", template)
    ref = PreTrainedTokenizerFast.from_pretrained(str(d))
    tok = Tokenizer(d)
    ours = ChatTemplate(load_chat_template(d), tok.template_variables())
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object"}}}]
    for conv in CONVERSATIONS:
        for kw in ({}, {"tools": tools}):
            try:
                expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt, **kw)
            except Exception as e:  # noqa: BLE001 - the template's raise_exception
                with pytest.raises(ChatTemplateError, match=str(e)[:20]):
                    ours.render(conv, add_generation_prompt=gen_prompt, **kw)
                continue
            text = ours.render(conv, add_generation_prompt=gen_prompt, **kw)
            assert text == expected
            ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen_prompt, **kw)
            assert tok.encode(text, add_special_tokens=False) == list(ids)


def test_template_sources(tok_dir: Path, tmp_path: Path) -> None:
    named = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "T"}]
    d = _with_template(tok_dir, tmp_path / "named", named)
    assert load_chat_template(d) == named[0]["template"]
    assert load_chat_template(d, "tool_use") == "T"
    with pytest.raises(ChatTemplateError, match="not found"):
        load_chat_template(d, "nope")
    (d / "chat_template.jinja").write_text("J")  # what transformers >= 4.50 saves; wins over the config
    assert load_chat_template(d) == "J"
    expected = json.loads((tok_dir / "tokenizer_config.json").read_text()).get("chat_template")
    assert load_chat_template(tok_dir) == expected
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
