"""A local Hugging Face hub: the chat datasets in their exact parquet schemas behind the parquet listing API.

    def test_something(hub_server):              # the fixture, registered in tests/conftest.py
        items = load_eval_items("gsm8k")          # HF_ENDPOINT points at the server, the cache is fresh
        assert len(items) == hub_server.rows[("openai/gsm8k", "main", "test")]

The `hub_server` fixture writes every split the chat stage uses (HUB_SPLITS: SmolTalk train/test, MMLU
auxiliary_train/test, GSM8K train/test, ARC-Easy/ARC-Challenge test, HumanEval test), serves them on 127.0.0.1,
and for the test's duration sets HF_ENDPOINT to the server and NANOCHAT_FLYTE_CACHE to a fresh folder, so code that
uses the defaults downloads from it into an empty cache. `hub_server.rows[(repo, subset, split)]` is each split's
row count. It is a ShardServer: `fail(path, kind)` injects faults, `requests_for(path)` lists what was asked.

The server answers like the hub:
- `GET /api/datasets/{repo}/parquet/{subset}/{split}`: a JSON list of the split's parquet URLs, which point back
  at the server as the hub's do: `.../parquet/{subset}/{split}/0.parquet`, `.../1.parquet`, ...
- those URLs: the files (Range, HEAD); anything else: 404.
The files live at `<directory>/api/datasets/{repo}/parquet/{subset}/{split}/{n}.parquet`.

The content is generated, deterministic and real-looking: conversations (some with a system message, some with
several turns), multiple choice questions whose marked answer is right, GSM8K word problems whose worked solutions
carry calculator annotations `<<a*b=c>>` and end with `#### N`, ARC questions with 3-5 choices (some labelled
"1".."4"), HumanEval functions whose canonical solution passes their `check(candidate)`.
"""

import contextlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.shard_server import ShardServer

# ----------------------------------------------------------------------------- the schemas, as on the hub

SMOLTALK_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                             ("source", pa.string())])
MMLU_SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())])  # a ClassLabel A-D on the hub: stored as its index 0-3
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
HUMANEVAL_SCHEMA = pa.schema([(name, pa.string())
                              for name in ("task_id", "prompt", "canonical_solution", "test", "entry_point")])

# ----------------------------------------------------------------------------- SmolTalk

TOPICS = [  # (topic, explanation, example)
    ("photosynthesis", "Photosynthesis is how plants make their own food. Using the energy of sunlight, they combine "
     "carbon dioxide from the air with water to make glucose, and they release oxygen as a by-product.",
     "A sunflower in a field: its leaves take in sunlight and CO2 all day, and the sugar they make feeds its growth."),
    ("a black hole", "A black hole is a region of space where gravity is so strong that nothing, not even light, can "
     "escape. It forms when a very massive star collapses under its own weight.",
     "Sagittarius A* at the centre of our galaxy has about four million times the mass of the Sun."),
    ("inflation", "Inflation is the rate at which prices rise over time. When inflation is 3% a year, something that "
     "cost $100 last year costs about $103 today, so each dollar buys a little less.",
     "If a coffee cost $2.00 in 2020 and $2.40 in 2024, its price rose by 20% over those four years."),
    ("recursion in programming", "Recursion is when a function calls itself to solve a smaller version of the same "
     "problem. Every call must move toward a base case, which stops the chain of calls.",
     "def factorial(n):\n    return 1 if n == 0 else n * factorial(n - 1)\n\nfactorial(4) calls factorial(3), "
     "and so on down to factorial(0), which returns 1."),
    ("the water cycle", "The water cycle is the continuous movement of water on Earth: it evaporates from oceans and "
     "lakes, condenses into clouds, falls as rain or snow, and flows back to the sea.",
     "A puddle that disappears on a sunny afternoon has evaporated; that vapour may fall as rain far away."),
    ("compound interest", "Compound interest is interest earned on both your original money and the interest it has "
     "already earned, so savings grow faster and faster over time.",
     "$1,000 at 5% a year becomes $1,050 after one year and $1,102.50 after two, because the second year's interest "
     "is also paid on the first year's $50."),
    ("an API", "An API (application programming interface) is a set of rules that lets one program ask another for "
     "data or services, without knowing how the other program works inside.",
     "A weather app calls a weather service's API with a city name and gets back the forecast as JSON."),
    ("plate tectonics", "Plate tectonics is the theory that Earth's outer shell is broken into large plates that "
     "slowly move, causing earthquakes, volcanoes and mountain ranges where they meet.",
     "The Himalayas are still rising because the Indian plate keeps pushing into the Eurasian plate."),
    ("the café culture of Paris", "Paris's café culture is the tradition of spending time at small cafés to talk, "
     "read or watch the street. Cafés have been meeting places for writers and artists since the 18th century.",
     "Café de Flore in Saint-Germain-des-Prés was a favourite of Jean-Paul Sartre and Simone de Beauvoir."),
]
QUESTION_TEMPLATES = ["Can you explain {topic} in simple terms?", "What is {topic}?",
                      "I'm studying for an exam. Could you briefly describe {topic}?"]
FOLLOW_UPS = ["Thanks! Can you give me a short example?", "That helps. What would be a real-world example?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.",
                  "You are a patient tutor who explains things clearly and concisely, without jargon."]
REWRITES = [  # (informal, formal)
    ("hey, cant make it to the meeting tmrw, something came up", "I am afraid I will be unable to attend tomorrow's "
     "meeting, as something unexpected has come up. My apologies for the inconvenience."),
    ("the report is kinda late but we're on it", "The report is slightly delayed, but we are actively working on it "
     "and will share it shortly."),
    ("thx for the help yesterday, really saved me", "Thank you for your help yesterday; it made a real difference."),
]


def unique_rows(make_row: Callable[[random.Random], dict], num_rows: int, seed: int) -> list[dict]:
    """`num_rows` distinct rows from `make_row`, as a real dataset's rows are (an epoch count is then visible)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_rows:
        row = make_row(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def smoltalk_row(rng: random.Random) -> dict:
    topic, explanation, example = rng.choice(TOPICS)
    question = rng.choice(QUESTION_TEMPLATES).format(topic=topic)
    kind = rng.randrange(4)
    if kind == 0:
        messages, source = [("user", question), ("assistant", explanation)], "smol-magpie-ultra"
    elif kind == 1:
        messages = [("system", rng.choice(SYSTEM_PROMPTS)), ("user", question), ("assistant", explanation)]
        source = "systemchats-30k"
    elif kind == 2:
        messages = [("user", question), ("assistant", explanation), ("user", rng.choice(FOLLOW_UPS)),
                    ("assistant", example)]
        source = "everyday-conversations"
    else:
        informal, formal = rng.choice(REWRITES)
        messages = [("user", f"Rewrite this message to sound more professional:\n\n{informal}"),
                    ("assistant", formal)]
        source = "smol-rewrite"
    return {"messages": [{"content": content, "role": role} for role, content in messages], "source": source}


# ----------------------------------------------------------------------------- MMLU

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
            ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Egypt", "Cairo"), ("Norway", "Oslo"),
            ("Peru", "Lima"), ("Vietnam", "Hanoi")]
FACTS = [  # (subject, question, right answer, three wrong answers)
    ("college_biology", "Which organelle is the site of cellular respiration in eukaryotic cells?", "Mitochondrion",
     ["Ribosome", "Golgi apparatus", "Lysosome"]),
    ("high_school_physics", "What is the SI unit of force?", "Newton", ["Joule", "Watt", "Pascal"]),
    ("astronomy", "Which planet has the shortest orbital period around the Sun?", "Mercury",
     ["Venus", "Mars", "Earth"]),
    ("high_school_chemistry", "What is the chemical formula of table salt?", "NaCl", ["KCl", "NaOH", "CaCO3"]),
    ("computer_security", "Which of these is a symmetric-key encryption algorithm?", "AES",
     ["RSA", "Diffie-Hellman", "ECDSA"]),
    ("world_religions", "In which city is the Kaaba located?", "Mecca", ["Medina", "Jerusalem", "Damascus"]),
]


def mmlu_question(rng: random.Random) -> tuple[str, str, str, list[str]]:
    """(subject, question, right answer, wrong answers), one of three kinds."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(3, 19), rng.randint(3, 19)
        wrong = sorted({a * b + a, a * b - b, a * b + 1, (a + 1) * (b + 1)} - {a * b})[:3]
        return "elementary_mathematics", f"What is {a} × {b}?", str(a * b), [str(w) for w in wrong]
    if kind == 1:
        country, capital = rng.choice(CAPITALS)
        others = rng.sample([c for _, c in CAPITALS if c != capital], 3)
        return "high_school_geography", f"What is the capital of {country}?", capital, others
    return rng.choice(FACTS)


def mmlu_row(rng: random.Random) -> dict:
    subject, question, right, wrong = mmlu_question(rng)
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"question": question, "subject": subject, "choices": choices, "answer": choices.index(right)}


# ----------------------------------------------------------------------------- GSM8K

NAMES = ["Natalia", "Weng", "Betty", "James", "Maria", "Tobias", "Aisha", "Kenji"]


def gsm8k_problem(rng: random.Random) -> tuple[str, str]:
    """(question, worked answer with <<...>> annotations and a final `#### N`)."""
    name = rng.choice(NAMES)
    kind = rng.randrange(3)
    if kind == 0:
        have, bags, per_bag = rng.randint(2, 20), rng.randint(2, 6), rng.randint(3, 12)
        bought = bags * per_bag
        total = have + bought
        return (f"{name} has {have} apples. Then {name} buys {bags} bags with {per_bag} apples in each bag. "
                f"How many apples does {name} have now?",
                f"{name} buys {bags} * {per_bag} = <<{bags}*{per_bag}={bought}>>{bought} apples.\n"
                f"Now {name} has {have} + {bought} = <<{have}+{bought}={total}>>{total} apples.\n#### {total}")
    if kind == 1:
        price, count = rng.randint(2, 9), rng.randint(2, 8)
        cost = price * count
        bill = 50 if cost < 50 else 100
        change = bill - cost
        return (f"Pens cost ${price} each. {name} buys {count} pens and pays with a ${bill} bill. "
                f"How much change does {name} get?",
                f"The pens cost {count} * ${price} = $<<{count}*{price}={cost}>>{cost}.\n"
                f"The change is ${bill} - ${cost} = $<<{bill}-{cost}={change}>>{change}.\n#### {change}")
    per_day, days = rng.choice([120, 250, 375, 480]), rng.choice([4, 6, 8])
    made = per_day * days
    half = made // 2
    return (f"A bakery bakes {per_day} loaves of bread a day. How many loaves does it bake in {days} days, and how "
            f"many are left if it sells half of them?",
            f"In {days} days it bakes {per_day} * {days} = <<{per_day}*{days}={made}>>{made} loaves.\n"
            f"It sells {made} / 2 = <<{made}/2={half}>>{half} loaves, so {half} loaves are left.\n#### {half}")


def gsm8k_row(rng: random.Random) -> dict:
    return dict(zip(("question", "answer"), gsm8k_problem(rng)))


# ----------------------------------------------------------------------------- ARC

ARC_QUESTIONS = [  # (question, right answer, wrong answers: 2 to 4, so 3 to 5 choices)
    ("Which form of energy does a solar panel change into electrical energy?", "light", ["sound", "heat"]),
    ("A student mixes baking soda and vinegar, and bubbles form. What does this show?", "a chemical reaction",
     ["a change of state", "evaporation", "condensation"]),
    ("Which body system carries oxygen to the cells?", "the circulatory system",
     ["the digestive system", "the skeletal system", "the nervous system", "the excretory system"]),
    ("Which property of a mineral can be tested by scratching it on glass?", "hardness",
     ["luster", "color", "streak"]),
    ("What causes day and night on Earth?", "Earth rotating on its axis",
     ["Earth revolving around the Sun", "the Moon orbiting Earth", "the tilt of Earth's axis"]),
    ("Which of these is a renewable resource?", "wind", ["coal", "natural gas", "oil"]),
    ("A plant grows toward a window. This response to light is called", "phototropism",
     ["gravitropism", "thigmotropism"]),
    ("Which tool is best for measuring the volume of a liquid?", "a graduated cylinder",
     ["a balance", "a thermometer", "a meter stick"]),
]
ARC_ID_PREFIXES = ["Mercury_", "MCAS_2004_5_", "NYSEDREGENTS_2015_4_", "ACTAAP_2013_7_", "MDSA_2008_8_"]


def arc_row(rng: random.Random) -> dict:
    question, right, wrong = rng.choice(ARC_QUESTIONS)
    texts = [right, *wrong]
    rng.shuffle(texts)
    # most questions are labelled A, B, C, ...; some (older exams) 1, 2, 3, ...
    labels = [str(i + 1) for i in range(len(texts))] if rng.random() < 0.2 else list("ABCDE"[:len(texts)])
    return {"id": f"{rng.choice(ARC_ID_PREFIXES)}{rng.randint(1, 9999999)}", "question": question,
            "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(right)]}

# ----------------------------------------------------------------------------- HumanEval

HUMANEVAL_FUNCTIONS = [  # (prompt, canonical_solution, test, entry_point): real code; the solution passes check
    ('def add(x: int, y: int) -> int:\n    """Add two numbers x and y.\n    >>> add(2, 3)\n    5\n    """\n',
     "    return x + y\n",
     "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"
     "    assert candidate(0, 7) == 7\n", "add"),
    ('def is_palindrome(text: str) -> bool:\n    """Whether text reads the same forwards and backwards.\n'
     "    >>> is_palindrome('aba')\n    True\n    >>> is_palindrome('ab')\n    False\n    \"\"\"\n",
     "    return text == text[::-1]\n",
     "\n\ndef check(candidate):\n    assert candidate('') is True\n    assert candidate('racecar') is True\n"
     "    assert candidate('abca') is False\n", "is_palindrome"),
    ('from typing import List\n\n\ndef sum_of_squares(numbers: List[int]) -> int:\n    """The sum of the squares '
     'of the numbers.\n    >>> sum_of_squares([1, 2, 3])\n    14\n    """\n',
     "    return sum(n * n for n in numbers)\n",
     "\n\ndef check(candidate):\n    assert candidate([]) == 0\n    assert candidate([1, 2, 3]) == 14\n"
     "    assert candidate([-2]) == 4\n", "sum_of_squares"),
    ('def count_vowels(word: str) -> int:\n    """How many of the letters of word are vowels (a, e, i, o, u, '
     'either case).\n    >>> count_vowels("Apple")\n    2\n    """\n',
     '    return sum(1 for letter in word.lower() if letter in "aeiou")\n',
     "\n\ndef check(candidate):\n    assert candidate('Apple') == 2\n    assert candidate('rhythm') == 0\n"
     "    assert candidate('AEIOU') == 5\n", "count_vowels"),
    ('from typing import List\n\n\ndef running_max(numbers: List[int]) -> List[int]:\n    """The largest number '
     'seen so far, at each position.\n    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    """\n',
     "    result = []\n    for n in numbers:\n        result.append(n if not result else max(result[-1], n))\n"
     "    return result\n",
     "\n\ndef check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]\n"
     "    assert candidate([4, 1]) == [4, 4]\n", "running_max"),
    ('def fizz_buzz(n: int) -> str:\n    """"Fizz" if n is divisible by 3, "Buzz" if by 5, "FizzBuzz" if by both, '
     'else n as text.\n    >>> fizz_buzz(10)\n    \'Buzz\'\n    """\n',
     '    if n % 15 == 0:\n        return "FizzBuzz"\n    if n % 3 == 0:\n        return "Fizz"\n'
     '    if n % 5 == 0:\n        return "Buzz"\n    return str(n)\n',
     "\n\ndef check(candidate):\n    assert candidate(9) == 'Fizz'\n    assert candidate(10) == 'Buzz'\n"
     "    assert candidate(30) == 'FizzBuzz'\n    assert candidate(7) == '7'\n", "fizz_buzz"),
    ('def digit_sum(n: int) -> int:\n    """The sum of the decimal digits of a non-negative integer.\n'
     '    >>> digit_sum(1234)\n    10\n    """\n',
     "    return sum(int(d) for d in str(n))\n",
     "\n\ndef check(candidate):\n    assert candidate(0) == 0\n    assert candidate(1234) == 10\n"
     "    assert candidate(999) == 27\n", "digit_sum"),
    ('def reverse_words(sentence: str) -> str:\n    """The words of sentence in reverse order, single-spaced.\n'
     "    >>> reverse_words('hello big world')\n    'world big hello'\n    \"\"\"\n",
     "    return ' '.join(reversed(sentence.split()))\n",
     "\n\ndef check(candidate):\n    assert candidate('hello big world') == 'world big hello'\n"
     "    assert candidate('one') == 'one'\n    assert candidate('  a  b ') == 'b a'\n", "reverse_words"),
]


def humaneval_rows() -> list[dict]:
    return [{"task_id": f"HumanEval/{index}", "prompt": prompt, "canonical_solution": solution, "test": test,
             "entry_point": entry_point}
            for index, (prompt, solution, test, entry_point) in enumerate(HUMANEVAL_FUNCTIONS)]

# ----------------------------------------------------------------------------- the splits

# Train and test rows come from one pool of distinct rows, so that no test row is also a training row.
SMOLTALK = unique_rows(smoltalk_row, 48 + 24, seed=1)
MMLU = unique_rows(mmlu_row, 36 + 30, seed=2)
GSM8K = unique_rows(gsm8k_row, 30 + 20, seed=3)
ARC = unique_rows(arc_row, 24 + 20, seed=4)

# (repo, subset, split): (schema, rows, number of parquet files)
HUB_SPLITS = {
    ("HuggingFaceTB/smol-smoltalk", "default", "train"): (SMOLTALK_SCHEMA, SMOLTALK[:48], 2),
    ("HuggingFaceTB/smol-smoltalk", "default", "test"): (SMOLTALK_SCHEMA, SMOLTALK[48:], 1),
    # auxiliary_train rows have an empty subject on the hub
    ("cais/mmlu", "all", "auxiliary_train"): (MMLU_SCHEMA, [row | {"subject": ""} for row in MMLU[:36]], 1),
    ("cais/mmlu", "all", "test"): (MMLU_SCHEMA, MMLU[36:], 1),
    ("openai/gsm8k", "main", "train"): (GSM8K_SCHEMA, GSM8K[:30], 1),
    ("openai/gsm8k", "main", "test"): (GSM8K_SCHEMA, GSM8K[30:], 1),
    ("allenai/ai2_arc", "ARC-Easy", "test"): (ARC_SCHEMA, ARC[:24], 1),
    ("allenai/ai2_arc", "ARC-Challenge", "test"): (ARC_SCHEMA, ARC[24:], 1),
    ("openai/openai_humaneval", "openai_humaneval", "test"): (HUMANEVAL_SCHEMA, humaneval_rows(), 1),
}


def split_path(repo: str, subset: str, split: str) -> str:
    """The listing path of a split, as the hub spells it."""
    return f"/api/datasets/{repo}/parquet/{subset}/{split}"


def write_split(root: Path, repo: str, subset: str, split: str, rows: list[dict], schema: pa.Schema,
                num_files: int = 1) -> list[Path]:
    """Write `rows` in `schema` as the split's parquet files 0.parquet, 1.parquet, ... under `root`."""
    directory = root / split_path(repo, subset, split).lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(rows) // num_files)  # ceil: every file gets rows
    paths = []
    for index in range(num_files):
        path = directory / f"{index}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[index * per_file:(index + 1) * per_file], schema=schema), path)
        paths.append(path)
    return paths


def write_hub_datasets(root: Path) -> dict[tuple[str, str, str], int]:
    """Every split of HUB_SPLITS under `root`; returns the row count of each."""
    for (repo, subset, split), (schema, rows, num_files) in HUB_SPLITS.items():
        write_split(root, repo, subset, split, rows, schema, num_files)
    return {key: len(rows) for key, (_, rows, _) in HUB_SPLITS.items()}

# ----------------------------------------------------------------------------- the server


class HubServer(ShardServer):
    """A ShardServer that also answers the parquet listing API for the splits under its directory."""

    def __init__(self, directory: Path, port: int = 0):
        super().__init__(directory, port)
        self.rows: dict[tuple[str, str, str], int] = {}  # row count of each split (repo, subset, split)

    def content(self, path: str) -> bytes | None:
        directory = self.directory / path.lstrip("/")
        if path.startswith("/api/datasets/") and "/parquet/" in path and directory.is_dir():
            files = sorted(directory.glob("*.parquet"), key=lambda file: int(file.stem))
            if files:
                return json.dumps([f"{self.url}{path}/{file.name}" for file in files]).encode()
        return super().content(path)


@contextlib.contextmanager
def serve_hub(directory: Path, port: int = 0) -> Iterator[HubServer]:
    server = HubServer(directory, port)
    with server.running():
        yield server


@pytest.fixture
def hub_server(tmp_path, monkeypatch) -> Iterator[HubServer]:
    """Every split of HUB_SPLITS served on 127.0.0.1; HF_ENDPOINT points at it, NANOCHAT_FLYTE_CACHE is fresh."""
    rows = write_hub_datasets(tmp_path / "hub")
    with serve_hub(tmp_path / "hub") as server:
        server.rows = rows
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server
