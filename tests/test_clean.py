import gzip
import json
import string
import subprocess
import sys
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from conf.schema import DataConfig, RunConfig, UserError
from flows.cli import main
from tasks.builtin_data import HELDOUT_QUESTIONS, TRAIN_QUESTIONS
import tasks.clean.stage
from tasks.clean import GRAM_MIX, DataError, NearDuplicates, clean, in_eval_split
from tasks.context import RunContext

IDENTITY = {"name": "Ember", "author": "the loraflow team"}
OPENAI = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
ALPACA = {"instruction": "Add the numbers", "input": "1 and 2", "output": "3", "system": "Be brief.",
          "history": [["Hi", "Hello!"]]}
TEXT = {"text": "Python is a programming language."}


def data(train, evaluation=(), **options):
    return DataConfig(train=[str(t) for t in train], eval=[str(e) for e in evaluation], **options)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_accounted(result):
    """The invariant: on every source, kept + rejected == read, and the files hold exactly those rows."""
    report = json.loads(result.report_path.read_text())
    for counts in report["sources"].values():
        assert counts["kept"] + sum(counts["rejected"].values()) == counts["read"]
    assert sum(c["kept"] for c in report["sources"].values()) == result.train_rows + result.eval_rows
    assert sum(sum(c["rejected"].values()) for c in report["sources"].values()) == result.rejected_rows
    assert len(read_jsonl(result.rejects_path)) == result.rejected_rows
    return report


def test_identity_data_fills_placeholders_and_keeps_heldout_phrasings_apart(tmp_path):
    config = RunConfig()
    result = clean(config.data, RunContext(tmp_path), values=IDENTITY)
    train, evaluation = read_jsonl(result.train_path), read_jsonl(result.eval_path)
    text = json.dumps(train + evaluation)
    assert "{{" not in text and "Ember" in text and "the loraflow team" in text
    train_prompts = {row["messages"][0]["content"] for row in train}
    eval_prompts = {row["messages"][0]["content"] for row in evaluation}
    assert eval_prompts == set(HELDOUT_QUESTIONS)
    assert not train_prompts & eval_prompts
    assert set(TRAIN_QUESTIONS) <= train_prompts
    assert_accounted(result)


def test_each_format_becomes_one_shape(tmp_path):
    source = write_jsonl(tmp_path / "mixed.jsonl", [OPENAI, SHAREGPT, ALPACA, TEXT])
    result = clean(data([source]), RunContext(tmp_path / "out"))
    rows = read_jsonl(result.train_path)
    assert rows[0] == OPENAI
    assert rows[1]["messages"] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert rows[2]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add the numbers\n\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert rows[3] == TEXT
    report = assert_accounted(result)
    assert report["sources"][str(source)]["format"] == "alpaca+openai+sharegpt+text"


def test_openai_content_parts_and_role_aliases(tmp_path):
    row = {"messages": [{"role": "Human", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                        {"role": "bot", "content": "Hello"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                          {"role": "assistant", "content": "A cat."}]}
    result = clean(data([write_jsonl(tmp_path / "parts.jsonl", [row, image])]), RunContext(tmp_path / "out"))
    assert read_jsonl(result.train_path)[0]["messages"][0] == {"role": "user", "content": "Hi\nthere"}
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["has_images"]  # an image part: not text


@pytest.mark.parametrize("chunk_rows", [1024, 3])
def test_every_reject_reason_with_its_origin(tmp_path, monkeypatch, chunk_rows):
    monkeypatch.setattr(tasks.clean.stage, "CHUNK_ROWS", chunk_rows)  # duplicates across chunk boundaries too
    rows = [
        OPENAI,
        OPENAI,
        {"messages": [{"role": "user", "content": "What is 2+2 ?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": " \t "}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        {"something": "else"},
        [1, 2],
        {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]},
        {"text": "x" * 200},  # a document: never too long (tokenize cuts it into blocks)
    ]
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{broken json\n" + b'{"text": "\xff\xfe"}\n')
    result = clean(data([source], max_chars=100), RunContext(tmp_path / "out"))
    rejects = read_jsonl(result.rejects_path)
    assert [r["reason"] for r in rejects] == [
        "duplicate", "near_duplicate", "no_assistant_turn", "ends_on_user_turn", "unknown_role", "empty_turn",
        "wrong_type", "unknown_format", "not_an_object", "too_long", "invalid_json", "not_utf8",
    ]
    assert rejects[0]["origin"] == f"{source}:2" and rejects[-1]["origin"] == f"{source}:14"
    assert {"text": "x" * 200} in read_jsonl(result.train_path)
    assert rejects[0]["row"] == OPENAI
    assert_accounted(result)


def test_bulk_signatures_equal_datasketch_minhash_of_each_row():
    texts = ["", "!!!", "one", "Two words", "The quick brown fox jumps over the lazy dog.",
             "the quick brown fox jumps over the lazy cat", "x " * 500]
    signatures = NearDuplicates(0.9).signatures(texts)
    for text, signature in zip(texts, signatures, strict=True):
        words = [zlib.crc32(w.encode()) for w in text.lower().translate(str.maketrans(dict.fromkeys(string.punctuation, " "))).split() or [""]] + [0, 0]
        grams = [(a * GRAM_MIX[0] ^ b * GRAM_MIX[1] ^ c) & 0xFFFFFFFF for a, b, c in zip(words, words[1:], words[2:])]
        reference = MinHash(num_perm=len(signature), scheme="affine32", hashfunc=int)
        reference.update_batch(grams[: max(len(words) - 4, 1)])
        assert (signature == reference.hashvalues).all(), text
    similarity = MinHash(hashvalues=signatures[4], scheme="affine32").jaccard(MinHash(hashvalues=signatures[5], scheme="affine32"))
    assert 0.5 < similarity < 1


def test_forced_format_rejects_other_shapes(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [OPENAI, ALPACA])
    result = clean(data([source], format="alpaca"), RunContext(tmp_path / "out"))
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["wrong_format"]


def test_column_mapping_and_placeholders(tmp_path):
    source = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Who are you?", "answer": "I am {{name}} by {{ author }}."}])
    result = clean(data([source], columns={"instruction": "question", "output": "answer"}), RunContext(tmp_path / "o"), values=IDENTITY)
    assert read_jsonl(result.train_path)[0]["messages"][1]["content"] == "I am Ember by the loraflow team."


def test_nul_escape_bom_and_whitespace_are_normalised(tmp_path):
    row = {"messages": [{"role": "user", "content": "\ufeffHe\x00llo\x1b[31m  world\r\n\tok"},
                        {"role": "assistant", "content": "Cafe\u0301"}]}
    result = clean(data([write_jsonl(tmp_path / "ctl.jsonl", [row])]), RunContext(tmp_path / "out"))
    messages = read_jsonl(result.train_path)[0]["messages"]
    assert messages[0]["content"] == "Hello[31m world\nok"
    assert messages[1]["content"] == "Caf\u00e9"


def test_a_one_megabyte_row_is_kept_when_the_limit_allows(tmp_path):
    big = {"messages": [{"role": "user", "content": "Summarise: " + "word " * 200_000},
                        {"role": "assistant", "content": "Words."}]}
    source = write_jsonl(tmp_path / "big.jsonl", [big])
    assert source.stat().st_size > 1_000_000
    kept = clean(data([source], max_chars=2_000_000), RunContext(tmp_path / "a"))
    assert kept.train_rows == 1
    rejected = clean(data([source]), RunContext(tmp_path / "b"))
    assert [r["reason"] for r in read_jsonl(rejected.rejects_path)] == ["too_long"]


def test_containers_compressed_parquet_text_folders_and_saved_datasets(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json.gz").write_bytes(gzip.compress(json.dumps([OPENAI]).encode()))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps(SHAREGPT) + "\n").encode()))
    (folder / "c.txt").write_text("A plain document.\nSecond line.")
    (folder / "d.txt.gz").write_bytes(gzip.compress(b"A compressed document."))
    pq.write_table(pa.Table.from_pylist([{"instruction": "Say hi", "input": "", "output": "Hi"}]), folder / "e.parquet")
    (folder / "notes.md").write_text("A markdown document.")
    saved = tmp_path / "saved"
    Dataset.from_list([{"text": "From a saved dataset."}]).save_to_disk(str(saved))
    result = clean(data([folder, saved]), RunContext(tmp_path / "out"))
    rows = read_jsonl(result.train_path)
    assert len(rows) == 8  # c.txt is two documents: one per line, as `datasets`' text loader reads it
    assert {"text": "A plain document."} in rows and {"text": "Second line."} in rows
    assert {"text": "A markdown document."} in rows and {"text": "From a saved dataset."} in rows
    assert rows[0] == OPENAI
    assert_accounted(result)


def test_split_by_hash_is_stable_when_rows_are_added(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question number {i} about topic {i * 7}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(400)]
    first = clean(data([write_jsonl(tmp_path / "v1.jsonl", rows)], eval_fraction=0.2), RunContext(tmp_path / "a"))
    second = clean(data([write_jsonl(tmp_path / "v2.jsonl", rows[200:] + [OPENAI] + rows[:200])], eval_fraction=0.2),
                   RunContext(tmp_path / "b"))
    eval_first = {json.dumps(r) for r in read_jsonl(first.eval_path)}
    eval_second = {json.dumps(r) for r in read_jsonl(second.eval_path)}
    assert 40 <= len(eval_first) <= 120
    assert eval_first <= eval_second and not (eval_first & {json.dumps(r) for r in read_jsonl(second.train_path)})
    assert not in_eval_split("f" * 64, 0.2) and in_eval_split("0" * 64, 0.2)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("rows.json", b'{"not": "an array"}', "expected a JSON array of rows, got dict"),
        ("rows.json", b"[1, 2", "not valid JSON"),
        ("rows.jsonl", b"", "empty file"),
        ("rows.json", b"\xff\xfe\x00bad", "not UTF-8 text"),
        ("rows.jsonl.gz", b"not gzip at all", "cannot read"),
        ("rows.parquet", b"PAR1 nope", "not a readable Parquet file"),
        ("rows.xlsx", b"PK\x03\x04", "unsupported file type .xlsx"),
    ],
)
def test_unreadable_file_stops_with_one_line_naming_it(tmp_path, name, content, expected):
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(DataError) as error:
        clean(data([source]), RunContext(tmp_path / "out"))
    message = str(error.value)
    assert message.startswith(f"{source}: ") and expected in message and "\n" not in message
    assert not (tmp_path / "out" / "clean" / "train.jsonl").exists()


def loraflow_data(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", "data", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_data_command_prints_per_file_counts_as_json(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [OPENAI, OPENAI, SHAREGPT])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([ALPACA, {"instruction": "x"}]))
    assert main(["data", str(good), str(alpaca), "--json", "--out", str(tmp_path / "out")]) == 0  # in this process
    report = json.loads(capsys.readouterr().out)
    assert report[str(good)] == {"format": "openai+sharegpt", "read": 3, "kept": 2, "rejected": {"duplicate": 1}}
    assert report[str(alpaca)] == {"format": "alpaca", "read": 2, "kept": 1, "rejected": {"unknown_format": 1}}
    assert (tmp_path / "out" / "clean" / "rejects.jsonl").exists()


def test_data_command_exits_2_with_one_line_for_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = loraflow_data(str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"loraflow: error: {bad}: not valid JSON (Expecting property name enclosed in double quotes at line 1)"]
    assert "Traceback" not in result.stdout + result.stderr


def conversation(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_a_train_row_that_repeats_a_held_out_row_is_dropped_from_train_not_eval(tmp_path):
    held = conversation("Which river flows through the old town of Prague?", "The Vltava flows through Prague.")
    near = conversation("Which river flows through the old town of Prague ?", "The Vltava flows through Prague!")
    other = conversation("Name a prime number.", "Seven.")
    train = write_jsonl(tmp_path / "train.jsonl", [held, near, other])  # train sources are listed first
    heldout = write_jsonl(tmp_path / "eval.jsonl", [held])
    result = clean(data([train], [heldout]), RunContext(tmp_path / "out"))
    report = assert_accounted(result)
    assert read_jsonl(result.eval_path) == [held] and read_jsonl(result.train_path) == [other]
    assert report["sources"][str(train)]["rejected"] == {"in_eval": 2}
    assert report["sources"][str(heldout)] == {"format": "openai", "read": 1, "kept": 1, "rejected": {}}


def test_with_eval_fraction_a_held_out_row_evicts_the_train_rows_that_nearly_repeat_it(tmp_path):
    rows = [conversation(f"Tell me fact number {i} about the planet Mars and its moons, please.",
                         f"Fact {i}: Mars has two small moons called Phobos and Deimos, fact {i}.") for i in range(60)]
    first = clean(data([write_jsonl(tmp_path / "a.jsonl", rows)], eval_fraction=0.3, near_duplicate_threshold=1.0),
                  RunContext(tmp_path / "a"))
    held = read_jsonl(first.eval_path)[0]
    # A near copy of a held-out row, listed before it: the held-out row still wins, whatever the order.
    copy = json.loads(json.dumps(held).replace("please.", "please!"))
    source = write_jsonl(tmp_path / "b.jsonl", [copy, *rows])
    second = clean(data([source], eval_fraction=0.3, near_duplicate_threshold=0.7), RunContext(tmp_path / "b"))
    report = assert_accounted(second)
    assert held in read_jsonl(second.eval_path) and copy not in read_jsonl(second.train_path)
    assert report["sources"][str(source)]["rejected"].get("in_eval", 0) >= 1
    rejected = {json.dumps(r["row"]) for r in read_jsonl(second.rejects_path) if r["reason"] == "in_eval"}
    assert json.dumps(copy) in rejected


def article(n: int, words: int) -> str:
    import random

    rng = random.Random(n)
    return " ".join(f"w{rng.randrange(50_000)}" for _ in range(words)) + f" (article {n})."


def test_a_corpus_of_long_articles_one_per_line_reads_every_article(tmp_path, capsys):
    articles = [article(n, 15_000) for n in range(30)]  # over 100,000 characters each: never too long
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("\n".join(articles) + "\n\n")
    result = clean(data([corpus], eval_fraction=0.1, near_duplicate_threshold=1.0), RunContext(tmp_path / "out"))
    report = assert_accounted(result)
    kept = read_jsonl(result.train_path) + read_jsonl(result.eval_path)
    assert sorted(row["text"] for row in kept) == sorted(articles) and min(map(len, articles)) > 100_000
    assert report["sources"][str(corpus)]["layout"] == (
        f"text, split by line: 30 documents, {sum(map(len, articles))} characters")
    assert "chat rows only" in report["max_chars"]
    assert main(["data", str(corpus), "--out", str(tmp_path / "printed")]) == 0
    assert "text, split by line: 30 documents" in capsys.readouterr().out


def test_paragraph_and_file_splits_and_a_folder_corpus(tmp_path):
    text = "First paragraph,\nits second line.\n\n\nSecond paragraph.\n  \nThird.\n"
    (tmp_path / "a.txt").write_text(text)
    paragraphs = clean(data([tmp_path / "a.txt"], text_split="paragraph"), RunContext(tmp_path / "p"))
    assert [row["text"] for row in read_jsonl(paragraphs.train_path)] == [
        "First paragraph,\nits second line.", "Second paragraph.", "Third."]
    assert read_jsonl(paragraphs.rejects_path) == []
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "one.txt").write_text(text)
    (folder / "two.md").write_text("# Title\n\nBody.")
    (folder / "three.txt.gz").write_bytes(gzip.compress(b"Gzipped\nbook."))
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    books = clean(data([folder], text_split="file"), RunContext(tmp_path / "f"))
    report = assert_accounted(books)
    assert sorted(row["text"] for row in read_jsonl(books.train_path)) == sorted(
        ["# Title\n\nBody.", "Gzipped\nbook.", "First paragraph,\nits second line.\n\n\nSecond paragraph.\n\nThird."])
    assert report["sources"][str(folder)]["rejected"] == {"not_utf8": 1}  # that file's reject; the others go on
    assert report["sources"][str(folder)]["layout"].startswith("text, split by file: 3 documents")


def test_multimodal_and_preference_rows_get_their_own_reasons_and_hints(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["cat.jpg"]},
        {"conversations": [{"from": "human", "value": "<image>Describe it."}, {"from": "gpt", "value": "Red."}]},
        {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "Rain."}]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
                      {"role": "assistant", "content": "Music."}]},
        {"instruction": "Pick one", "input": "", "output": "", "chosen": "A", "rejected": "B"},
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
         "rejected": {"from": "gpt", "value": "Go away"}},
    ]
    result = clean(data([write_jsonl(tmp_path / "mm.jsonl", rows)]), RunContext(tmp_path / "out"))
    report = assert_accounted(result)
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == [
        "has_images", "has_images", "has_video", "has_audio", "preference_pair", "preference_pair"]
    assert "train.objective: dpo" in report["hints"]["preference_pair"] and "has_images" in report["hints"]


GLAIVE_TOOLS = json.dumps([{"name": "get_weather", "description": "Weather in a city",
                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
SHAREGPT_TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": json.dumps({"temperature": 4})},
        {"from": "gpt", "value": "It is 4 degrees in Oslo."},
    ],
    "tools": GLAIVE_TOOLS,
}
OPENAI_TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 4})},
        {"role": "assistant", "content": "It is 4 degrees in Oslo."},
    ],
    "tools": [{"type": "function", "function": json.loads(GLAIVE_TOOLS)[0]}],
}


def test_tool_calls_from_sharegpt_and_openai_normalise_to_one_shape(tmp_path):
    sharegpt = clean(data([write_jsonl(tmp_path / "s.jsonl", [SHAREGPT_TOOL_ROW])]), RunContext(tmp_path / "s"))
    openai = clean(data([write_jsonl(tmp_path / "o.jsonl", [OPENAI_TOOL_ROW])]), RunContext(tmp_path / "o"))
    [row] = read_jsonl(sharegpt.train_path)
    assert read_jsonl(openai.train_path) == [row]
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert row["messages"][2] == {"role": "tool", "content": '{"temperature": 4}'}
    assert row["tools"][0]["function"]["name"] == "get_weather"


def test_broken_tool_calls_are_rejected_with_their_reasons(tmp_path):
    def with_turn(turn):
        return {"conversations": [{"from": "human", "value": "Weather?"}, turn, {"from": "gpt", "value": "Fine."}]}

    rows = [
        with_turn({"from": "function_call", "value": '{"name": "get_weather", "arguments": '}),  # cut off
        with_turn({"from": "function_call", "value": json.dumps({"arguments": {"city": "Oslo"}})}),  # no name
        with_turn({"from": "observation", "value": "4 degrees"}),  # a result no call asked for
        SHAREGPT_TOOL_ROW | {"tools": "[{"},
    ]
    result = clean(data([write_jsonl(tmp_path / "bad.jsonl", rows)]), RunContext(tmp_path / "out"))
    assert_accounted(result)
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == [
        "invalid_tool_call", "invalid_tool_call", "orphan_tool_result", "invalid_tool_call"]


def garbage_lines(rng):
    """Lines a real file may hold: random bytes, cut-off JSON, pathological structures, wrong types everywhere."""
    good = [json.dumps(OPENAI), json.dumps(SHAREGPT), json.dumps(ALPACA), json.dumps(SHAREGPT_TOOL_ROW)]
    shapes = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 60))),
        lambda: rng.choice(good).encode()[: rng.randint(1, 40)],
        lambda: ("[" * 50_000 + "]" * 50_000).encode(),
        lambda: ('{"messages": ' + "[" * 5_000 + "]" * 5_000 + "}").encode(),
        lambda: ("9" * 5_000).encode(),
        lambda: b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
        lambda: json.dumps({"messages": rng.choice([None, 5, "s", [None], [[]], [{"role": None}], {}])}).encode(),
        lambda: json.dumps({"conversations": [{"from": rng.choice(["human", "gpt", 3, None]),
                                               "value": rng.choice(["x", None, 7, [1], {"a": 1}])}]}).encode(),
        lambda: json.dumps({"instruction": rng.choice([None, 1, "x"]), "output": rng.choice([None, [], "y"]),
                            "history": rng.choice([None, 5, [[1]], [["a", "b"]], [["a", "b", "c"]]])}).encode(),
        lambda: json.dumps({"messages": [{"role": "assistant", "content": None,
                                          "tool_calls": rng.choice([5, "x", [None], [{"function": 3}], [{}]])}]}).encode(),
        lambda: json.dumps({"text": rng.choice([None, 5, "", "   ", ["a"], {"b": 1}])}).encode(),
        lambda: json.dumps({"tools": rng.choice(["[", 5, [1]]), **OPENAI}).encode(),
        lambda: rng.choice(good).encode(),
    ]
    return [rng.choice(shapes)() for _ in range(300)]


@pytest.mark.parametrize("seed", range(5))
def test_no_row_crashes_the_reader_and_every_row_is_accounted_for(tmp_path, seed):
    import random

    lines = garbage_lines(random.Random(seed))
    source = tmp_path / "garbage.jsonl"
    source.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    result = clean(data([source]), RunContext(tmp_path / "out"))
    report = assert_accounted(result)
    assert report["sources"][str(source)]["read"] == sum(1 for line in source.read_bytes().split(b"\n") if line.strip())
    assert result.train_rows >= 1  # the good rows among the garbage are kept


def test_a_builtin_set_whose_example_package_is_missing_stops_in_one_line(monkeypatch):
    import importlib.util

    import tasks.builtin_data
    from tasks.clean import check_source

    real = importlib.util.find_spec
    monkeypatch.setattr(tasks.builtin_data.importlib.util, "find_spec",
                        lambda name, *args: None if name == "vaderSentiment" else real(name, *args))
    with pytest.raises(UserError) as error:
        check_source("builtin:vader_lexicon")
    assert str(error.value) == ("builtin:vader_lexicon reads the vaderSentiment package, which is not installed: "
                                "pip install -e '.[examples]'")
    check_source("builtin:identity")  # the sets made here need no package
