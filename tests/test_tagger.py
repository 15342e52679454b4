"""The tagger task and its model: the spelling encoder, the bundled EWT treebank, the baseline,
word dropout and length-bucketed batches, on small data."""

import pytest
import torch

import rnnkit
from rnnkit.data import UNK, Vocab, ewt_conllu, read_conllu, sample_conllu
from rnnkit.models import CharEncoder, ModelConfig, Tagger, build_model
from rnnkit.tasks.tagger import TaggerTask, encode_sentences, spell


def sample_data(**changes) -> dict:
    data = {k: str(sample_conllu(k)) for k in ("train", "dev", "test")}
    data |= dict(embedding_dim=8, char_embedding_dim=6, char_hidden_size=5, word_dropout=0.25)
    return data | changes


@pytest.fixture(scope="module")
def prepared():
    task = TaggerTask()
    return task, task.prepare(sample_data())


def spelled(task: TaggerTask, *sentences: str) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_sentences([s.split() for s in sentences], task.preprocessing)


def test_char_encoder_gives_unseen_words_distinct_vectors_by_spelling(prepared):
    task, _ = prepared
    torch.manual_seed(0)
    encoder = CharEncoder(len(task.preprocessing["chars"]), 6, 5).eval()
    x, _ = spelled(task, "Zorblax visited Qwerty", "Qwerty met Zorblax")
    vocab = set(task.preprocessing["words"])
    assert "zorblax" not in vocab and "qwerty" not in vocab
    assert (x[0, 0, 0] == UNK) and (x[0, 2, 0] == UNK)
    chars = x[..., 1:].reshape(6, -1)  # (tokens, C)
    v = encoder(chars)  # (6, 10)
    assert v.shape == (6, 10)
    zorblax, qwerty = v[0], v[2]
    assert (zorblax - qwerty).abs().max() > 1e-3
    torch.testing.assert_close(v[5], zorblax, rtol=0, atol=0)
    torch.testing.assert_close(v[3], qwerty, rtol=0, atol=0)
    # Case is part of the spelling: "qwerty" is another word than "Qwerty".
    lower, _ = spelled(task, "qwerty")
    assert (encoder(lower[0, :, 1:]) - qwerty).abs().max() > 1e-3


def test_char_encoder_shares_repeated_words_exactly_as_if_each_were_encoded_alone():
    torch.manual_seed(0)
    encoder = CharEncoder(12, 4, 3).eval()
    words = torch.tensor([[2, 3, 0, 0], [5, 6, 7, 8], [2, 3, 0, 0], [9, 0, 0, 0], [5, 6, 7, 8]])
    together = encoder(words)
    alone = torch.cat([encoder(w[None, : int((w != 0).sum())]) for w in words])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


def test_tagger_tags_unknown_words_by_their_spelling(prepared):
    task, p = prepared
    torch.manual_seed(0)
    model = build_model(ModelConfig(**p.model, bidirectional=True, hidden_size=7)).eval()
    x, lengths = spelled(task, "Zorblax visited Qwerty", "Qwerty visited Zorblax")
    out = model(x, lengths)  # (2, 3, tags)
    assert out.shape == (2, 3, len(task.preprocessing["tags"]))
    # Both are the unknown word to the embedding, yet their outputs differ by spelling.
    assert (out[0, 0] - out[0, 2]).abs().max() > 1e-4


def test_spelled_tagger_refuses_a_batch_without_characters():
    model = Tagger(
        ModelConfig(
            "tagger",
            10,
            3,
            embedding_dim=4,
            char_vocab_size=8,
            char_embedding_dim=32,
            char_hidden_size=64,
        )
    )
    with pytest.raises(rnnkit.RNNInputError, match=r"\(B, T, 1 \+ C\).* got \(2, 3\)"):
        model(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(rnnkit.RNNInputError, match=r"CharEncoder: token id 8 is outside"):
        model(torch.tensor([[[2, 3, 8]]]))


def test_long_words_keep_their_first_and_last_characters():
    chars = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz", 2)}
    assert spell("abcdefgh", chars, 6) == [chars[c] for c in "abcfgh"]
    assert spell("abc", chars, 6) == [chars[c] for c in "abc"]
    assert spell("a?", chars, 6) == [chars["a"], UNK]


def test_bundled_ewt_has_the_standard_split_sizes():
    sizes = {}
    for part in ("train", "dev", "test"):
        sentences = read_conllu(ewt_conllu(part))
        sizes[part] = (len(sentences), sum(len(words) for words, _ in sentences))
        assert all(len(words) == len(tags) for words, tags in sentences)
    assert sizes == {
        "train": (12_544, 204_577),
        "dev": (2_001, 25_147),
        "test": (2_077, 25_094),
    }
    licence = ewt_conllu("train").with_name("ud-english-ewt-LICENSE.txt").read_text()
    assert licence.startswith("Attribution-ShareAlike 4.0 International")


def test_default_data_is_the_bundled_ewt_treebank():
    task = TaggerTask()
    args = dict(task.option_defaults)
    data = task.data_config(args)
    assert [data[k] for k in ("train", "dev", "test")] == [
        str(ewt_conllu(k)) for k in ("train", "dev", "test")
    ]


def test_most_frequent_tag_baseline_by_hand(tmp_path):
    rows = {
        "train": [
            [("the", "DET"), ("run", "NOUN"), ("ends", "VERB")],
            [("I", "PRON"), ("run", "VERB"), ("Run", "VERB")],
            [("a", "DET"), ("dog", "NOUN"), ("dogs", "NOUN")],
        ],
        "dev": [[("the", "DET")]],
        # run -> VERB (2 of 3); "cat" unseen -> NOUN, the most frequent open-class tag
        "test": [[("the", "DET"), ("run", "NOUN"), ("cat", "NOUN"), ("I", "PRON")]],
    }
    data = {}
    for part, sentences in rows.items():
        text = "".join(
            "".join(f"{i}\t{w}\t_\t{t}\t_\t_\t_\t_\t_\t_\n" for i, (w, t) in enumerate(s, 1)) + "\n"
            for s in sentences
        )
        (tmp_path / f"{part}.conllu").write_text(text)
        data[part] = str(tmp_path / f"{part}.conllu")
    task = TaggerTask()
    p = task.prepare(sample_data(**data))
    out = torch.zeros(*p.test.y.shape, len(task.preprocessing["tags"]))
    metrics = task.report(out, p.test.y, p.test).metrics
    assert metrics["test_baseline_accuracy"] == pytest.approx(3 / 4)
    assert metrics["test_baseline_unknown_accuracy"] == 1.0
    assert metrics["test_unknown_tokens"] == 1 and metrics["test_tokens"] == 4


def test_word_dropout_drops_rare_words_more_and_keeps_the_spelling(prepared):
    task, p = prepared
    torch.manual_seed(0)
    x = p.train.x[:20]
    counts = {w: 0 for w in task.preprocessing["words"]}
    for words, _ in read_conllu(sample_conllu("train")):
        for w in words:
            counts[w.lower()] += 1
    dropped = torch.zeros(x.shape[:2])
    for _ in range(200):
        y = task.train_inputs(x)
        torch.testing.assert_close(y[..., 1:], x[..., 1:])
        dropped += (y[..., 0] == UNK) & (x[..., 0] != UNK)
        assert ((y[..., 0] != x[..., 0]) <= (y[..., 0] == UNK)).all()
    words = x[..., 0]
    assert (dropped[words == 0] == 0).all()
    rate = {c: float(dropped[_count(words, task, counts) == c].mean() / 200) for c in (1, 2)}
    # a = 0.25 / 0.75 = 1/3: seen once 0.25, twice 1/7
    assert rate[1] == pytest.approx(0.25, abs=0.04)
    assert rate[2] == pytest.approx(1 / 7, abs=0.04)


def _count(words: torch.Tensor, task: TaggerTask, counts: dict) -> torch.Tensor:
    itos = task.preprocessing["words"]
    return torch.tensor([[counts.get(itos[int(i)], 0) for i in row] for row in words])


def test_batches_group_similar_lengths_and_keep_every_sentence_once():
    task = TaggerTask()
    lengths = torch.randint(1, 60, (1000,))
    order = torch.randperm(1000)
    batches = task.batches(order, lengths, 8, seed=3)
    assert len(batches) == 125
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    again = task.batches(order, lengths, 8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches) / len(batches)
    assert spread < 3
    # A batch size that does not divide the data: still ceil(n / B) batches.
    assert len(task.batches(order[:999], lengths, 8, seed=0)) == 125


def test_vocabularies_lowercase_words_but_not_characters(prepared):
    task, _ = prepared
    words, chars = task.preprocessing["words"], task.preprocessing["chars"]
    assert all(w == w.lower() for w in words)
    assert any(c.isupper() for c in chars)
    assert Vocab(words[2:]).itos == words
