"""Write a realistic sample corpus in the ReDSM5 layout (the real corpus is licensed).

Writes ``redsm5_posts.csv``, ``redsm5_annotations.csv`` and ``dsm5_criteria.json`` into the data
folder (``paths.data_dir``). The output is deterministic to the byte: only Python's ``random``
with a fixed seed, sorted keys and ``\\n`` line ends, so regenerating it anywhere leaves
``dvc status data.dvc`` clean.

What the sample contains, so that every code path of ``prepare`` and every difficulty of the task
is exercised: evidence for all nine criteria, 11+ phrasings each written for this project (mixed
register, typos, slang), hard negatives on each symptom's topic, negated mentions, neutral filler,
posts without evidence, sentences that are evidence for two criteria, ``status = 0`` rows,
``SPECIAL_CASE`` rows, annotations whose spacing/case differs from the post, and annotations the
sentence splitter cannot reproduce (the annotator split a sentence the post runs together).

Usage: ``python -m pipeline.sample_data [--out DIR] [--posts N] [--seed S]``
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import CRITERION_SYMPTOMS, SPECIAL_CASE
from pipeline.params import PARAMS_FILE, load_params

POSTS_FILE = "redsm5_posts.csv"
ANNOTATIONS_FILE = "redsm5_annotations.csv"
CRITERIA_FILE = "dsm5_criteria.json"
DEFAULT_POSTS = 160
DEFAULT_SEED = 5  # the sample's own seed: independent of params.yaml's seed on purpose

# Short paraphrases of DSM-5 criterion A, written for this project.
CRITERION_TEXTS = {
    "A.1": "Depressed mood most of the day, nearly every day: feeling sad, empty or hopeless.",
    "A.2": "Markedly diminished interest or pleasure in all, or almost all, activities.",
    "A.3": "Significant weight loss or gain, or a decrease or increase in appetite.",
    "A.4": "Insomnia or sleeping too much nearly every day.",
    "A.5": "Psychomotor agitation or slowing that others can observe: restless or slowed down.",
    "A.6": "Fatigue or loss of energy nearly every day.",
    "A.7": "Feelings of worthlessness or excessive or inappropriate guilt.",
    "A.8": "Diminished ability to think or concentrate, or indecisiveness, nearly every day.",
    "A.9": "Recurrent thoughts of death, suicidal ideation, a suicide plan or an attempt.",
}

# Evidence phrasings per symptom, with the annotator's rationale.
EVIDENCE: dict[str, tuple[str, list[str]]] = {
    "DEPRESSED_MOOD": ("Reports persistent low mood or sadness.", [
        "I feel so empty inside, like all the time.",
        "Honestly I've been sad pretty much every day for months now.",
        "idk why but i just cry every night lately",
        "There's this heavy grey cloud over me that never lifts.",
        "I'm so depressed I can barely get through the day.",
        "Everything feels hopeless and dark and I can't shake it.",
        "feelin low af again, third week in a row",
        "My mood has been in the gutter since christmas.",
        "Most days I wake up already feeling miserable.",
        "i feel numb and sad at the same time, its wierd",
        "Nothing cheers me up anymore, I'm just down all the time.",
        "Been crying in the bathroom at work most days this month.",
    ]),
    "ANHEDONIA": ("Describes loss of interest or pleasure in activities.", [
        "I used to love playing guitar but now I don't even want to touch it.",
        "Nothing is fun anymore, not even video games.",
        "i dont care about anything i used to enjoy tbh",
        "Hanging out with friends feels like a chore now.",
        "I stopped going to the gym because I just don't get anything out of it.",
        "Even my favourite shows feel pointless and boring.",
        "lost all interest in drawing, havent picked up a pencil in months",
        "Food, music, sex, it all feels flat to me.",
        "I can't remember the last time I actually enjoyed something.",
        "My hobbies just sit there, I have zero desire to do any of them.",
        "when my friends invite me out i just dont see the point anymore",
    ]),
    "APPETITE_CHANGE": ("Reports a change in appetite or weight.", [
        "I've lost like 15 pounds without trying because I'm never hungry.",
        "I barely eat anymore, maybe one meal a day if that.",
        "been stress eating nonstop, gained 20lbs since summer",
        "Food tastes like cardboard so I just skip meals.",
        "I keep bingeing on junk at 2am even when I'm not hungry.",
        "my appetite is completely gone, i have to force myself to eat",
        "My clothes are falling off me, I've dropped two sizes.",
        "I eat and eat and I've put on so much weight since this started.",
        "Haven't had a proper meal in days, just not hungry.",
        "i cant stop snacking, its like my only comfort rn",
        "My mom noticed I'm not finishing my plate anymore and I've gotten really thin.",
    ]),
    "SLEEP_ISSUES": ("Describes insomnia or hypersomnia.", [
        "I can't sleep, I lie awake until 4am every night.",
        "I've been sleeping 14 hours a day and still feel like I need more.",
        "insomnia is killing me, maybe 3 hrs a night",
        "I wake up at 5am and can't fall back asleep no matter what.",
        "All I want to do is sleep, I stay in bed till the afternoon.",
        "my sleep schedule is totally wrecked, up all night every night",
        "Even with melatonin I'm awake staring at the ceiling for hours.",
        "I nap all day and then can't sleep at night.",
        "havent slept properly in weeks, keep waking up every hour",
        "Sleeping is the only escape so I sleep through most weekends.",
        "I dread bedtime because I know I'll just lay there awake.",
    ]),
    "PSYCHOMOTOR": ("Observable psychomotor slowing or agitation.", [
        "I feel like I'm moving in slow motion all the time.",
        "I can't sit still, I keep pacing around my room.",
        "my body feels so heavy, even walking to the kitchen takes forever",
        "People keep telling me I talk really slowly now.",
        "I'm so restless I keep tapping and fidgeting all day.",
        "Everything I do feels sluggish, like wading through mud.",
        "cant stop pacing, my legs just wont stay still",
        "My coworker asked if I was okay because I was moving so slow.",
        "I get these bursts of agitation where I have to get up and walk around.",
        "It takes me ages to answer when someone talks to me, everything is slowed down.",
        "i keep wringing my hands and picking at my skin cause i cant settle",
    ]),
    "FATIGUE": ("Reports fatigue or loss of energy.", [
        "I'm exhausted all the time even when I've done nothing.",
        "I have zero energy, showering feels like running a marathon.",
        "so tired constantly, like my battery is always at 2%",
        "Just getting out of bed drains all my energy for the day.",
        "I'm completely drained by noon every single day.",
        "no energy to cook or clean, the dishes just pile up",
        "Even small tasks wipe me out completely.",
        "I feel physically worn out all the time for no reason.",
        "im so fatigued i had to call in sick again",
        "Brushing my teeth feels like too much effort lately.",
        "I have no stamina anymore, I get winded doing anything.",
    ]),
    "WORTHLESSNESS": ("Expresses worthlessness or excessive guilt.", [
        "I feel like a complete failure at everything.",
        "I'm such a burden to my family.",
        "i hate myself so much, i'm worthless",
        "I keep replaying every mistake I've ever made and feel so guilty.",
        "I'm useless, I can't do anything right.",
        "I feel guilty for existing and taking up space.",
        "im a waste of space honestly",
        "Whatever goes wrong I'm sure it's my fault.",
        "I don't deserve the people in my life.",
        "I feel so ashamed of who I am.",
        "Honestly I'm pathetic, a grown adult who can't hold down a job.",
    ]),
    "COGNITIVE_ISSUES": ("Reports poor concentration or indecisiveness.", [
        "I can't concentrate on anything, I read the same page five times.",
        "My brain is so foggy I forget what I was saying mid-sentence.",
        "cant focus at work at all, keep making dumb mistakes",
        "Even choosing what to eat feels like an impossible decision.",
        "I can't make up my mind about anything anymore.",
        "my memory is shot, i forget appointments constantly",
        "I zone out in lectures and can't follow anything.",
        "Decisions paralyze me, I just freeze.",
        "brain fog is unreal lately, cant think straight",
        "I lose track of conversations halfway through.",
        "I sat in front of my essay for three hours and couldn't write one sentence.",
    ]),
    "SUICIDAL_THOUGHTS": ("Expresses thoughts of death or suicide.", [
        "I keep thinking about killing myself.",
        "Sometimes I wish I could just go to sleep and never wake up.",
        "i dont want to be alive anymore",
        "I've been looking up ways to end it.",
        "I think about death all the time.",
        "I wrote a goodbye note last night.",
        "everyone would be better off if i was gone",
        "I have a plan and I'm scared of how calm I feel about it.",
        "If a car hit me tomorrow I honestly wouldn't mind.",
        "the thought of just not existing is the only thing that feels peaceful",
        "I stood on the bridge for a long time last week.",
    ]),
}

# Sentences that are evidence for two criteria at once.
MULTI_EVIDENCE = [
    ("I'm so exhausted and I still can't sleep at night.", ("FATIGUE", "SLEEP_ISSUES")),
    ("I hate myself and I honestly want to die.", ("WORTHLESSNESS", "SUICIDAL_THOUGHTS")),
    ("I'm sad all day and nothing I used to love makes me happy.",
     ("DEPRESSED_MOOD", "ANHEDONIA")),
    ("Too tired to even think straight, my head is mush.", ("FATIGUE", "COGNITIVE_ISSUES")),
    ("I stopped eating and I'm too sad to care.", ("APPETITE_CHANGE", "DEPRESSED_MOOD")),
]

# On a symptom's topic but not evidence; some are annotated with status 0 and a rationale.
HARD_NEGATIVES: dict[str, list[str]] = {
    "DEPRESSED_MOOD": [
        "My sister was sad when her dog died but she's doing better now.",
        "The movie was so sad, I cried at the ending lol.",
        "I was a bit down yesterday but today was actually good.",
    ],
    "ANHEDONIA": [
        "I still love going to concerts with my friends.",
        "I picked up knitting last month and I'm really enjoying it.",
        "Not really into football, never was.",
    ],
    "APPETITE_CHANGE": [
        "We tried a new ramen place and I ate way too much, no regrets.",
        "I'm eating less on purpose because I'm training for a race.",
        "My dog has been refusing his food, the vet says he's fine.",
    ],
    "SLEEP_ISSUES": [
        "I slept great on holiday, best sleep in ages.",
        "My roommate snores so loud lol.",
        "Went to bed late because the game went into overtime.",
    ],
    "PSYCHOMOTOR": [
        "I walked really slowly because I twisted my ankle.",
        "My kid can't sit still during dinner, classic five year old.",
        "The bus was so slow this morning.",
    ],
    "FATIGUE": [
        "I'm tired after my double shift but that's normal.",
        "Ran a half marathon on sunday and my legs are dead.",
        "Jet lag had me yawning for two days after the trip.",
    ],
    "WORTHLESSNESS": [
        "My boss said I did a great job on the project.",
        "I felt guilty for eating the last slice of pizza haha.",
        "I messed up the recipe but it was still edible.",
    ],
    "COGNITIVE_ISSUES": [
        "I forgot my keys again, typical monday.",
        "Couldn't decide between two jackets so I bought both.",
        "The lecture on thermodynamics went way over my head.",
    ],
    "SUICIDAL_THOUGHTS": [
        "My grandfather died last year and we still miss him.",
        "I'm reading a book about the history of the plague.",
        "This exam is killing me lol.",
    ],
}

# Explicitly denied symptoms: the topic is there, the evidence is not.
NEGATED = [
    ("I'm not suicidal, I want to make that clear.", "SUICIDAL_THOUGHTS"),
    ("My appetite is fine, I'm eating normally.", "APPETITE_CHANGE"),
    ("Sleep isn't the problem, I sleep okay most nights.", "SLEEP_ISSUES"),
    ("I don't feel worthless, I know I'm good at my job.", "WORTHLESSNESS"),
    ("I can still concentrate fine at work.", "COGNITIVE_ISSUES"),
    ("I wouldn't say I'm sad exactly, more confused.", "DEPRESSED_MOOD"),
    ("I still enjoy my weekends with my partner.", "ANHEDONIA"),
    ("Energy wise I'm fine, I go running every morning.", "FATIGUE"),
    ("Nobody has said I seem slowed down or jittery.", "PSYCHOMOTOR"),
]

NEUTRAL = [
    "I'm 24 and live with two roommates.",
    "Sorry for the long post.",
    "Throwaway account for obvious reasons.",
    "I work in retail at a grocery store.",
    "My therapist appointment is next Tuesday.",
    "We moved to a new city in March.",
    "Anyway, thanks for reading.",
    "Not sure if this is the right sub for this.",
    "English isn't my first language, sorry for mistakes.",
    "My parents are divorced and I mostly live with my dad.",
    "I started a new job in september.",
    "Has anyone else dealt with this?",
    "Any advice would be appreciated.",
    "TL;DR: things have been rough.",
    "I have a cat named Biscuit 🐱",
    "It's been raining here for a week straight.",
    "My girlfriend and I have been together three years.",
    "Edit: formatting.",
    "I study nursing at a community college.",
    "I don't really know what I'm asking for here.",
    "I've been on sertraline for about two months.",
    "My doctor wants me to try a different med.",
    "We had a family dinner last weekend.",
    "Café au lait is my go-to order, don't judge.",
    "Work has been busy with the end of the quarter.",
    "My brother is visiting from Montréal next month.",
    "I'm writing this on my phone so sorry for typos.",
    "My friend told me to post here.",
    "I'm a 31 year old guy, for context.",
    "We adopted a puppy in the spring.",
    "I've tried journaling, \"mindfulness\" apps, the whole thing.",
    "My therapist said to “take it one day at a time” — easier said than done.",
    "I had a check-up and my bloodwork came back normal.",
    "I live in a small town, there isn't much to do here.",
    "So here's some background.",
    "I'm in my final year of uni.",
    "My mum keeps asking if I'm okay.",
    "Long time lurker, first time posting.",
    "Update: I called the clinic today.",
    "I'm not looking for pity, just want to vent.",
]

SPECIAL_CASES = [
    ("I was diagnosed with bipolar II a few years ago.",
     "Relevant psychiatric history that maps to no single criterion."),
    ("My psychiatrist thinks it might be seasonal.",
     "Clinical context without a symptom."),
    ("I had a panic attack in the supermarket yesterday.",
     "Anxiety symptom outside the depression criteria."),
]

# Clauses an annotator splits off but the post runs into the evidence with a semicolon or dash.
RUN_ON_LEADS = [
    "Work has been busy;",
    "Not gonna lie -",
    "My therapist knows this;",
    "Since the breakup -",
]

PREFIXES = ["", "", "", "Honestly, ", "Lately ", "tbh ", "And ", "Also "]
SUFFIXES = ["", "", "", " idk.", " and it sucks.", " 😞", " ugh.", " lol"]


@dataclass
class _Sentence:
    text: str
    symptoms: tuple[str, ...] = ()  # evidence (status 1)
    rejected: str | None = None  # annotated with status 0 for this symptom
    special: str | None = None  # SPECIAL_CASE rationale
    annotated_text: str | None = None  # how the annotator wrote it, when it differs
    run_on: str | None = None  # clause the post text joins in front of it


def _vary(rng: random.Random, text: str) -> str:
    """Light surface variation so that phrasings are not verbatim repeats across posts."""
    prefix, suffix = rng.choice(PREFIXES), rng.choice(SUFFIXES)
    if prefix and text[:1].isupper() and not text.startswith("I "):
        text = text[0].lower() + text[1:]
    if suffix:
        text = text.rstrip(".") + suffix
    return prefix + text


def _post_sentences(rng: random.Random, with_evidence: bool) -> list[_Sentence]:
    symptoms = list(EVIDENCE)
    # Depressed mood, worthlessness and suicidal thoughts are the most frequent in the real data.
    weights = [3 if s in ("DEPRESSED_MOOD", "WORTHLESSNESS", "SUICIDAL_THOUGHTS") else 1.5
               for s in symptoms]
    body: list[_Sentence] = []
    if with_evidence:
        for symptom in dict.fromkeys(rng.choices(symptoms, weights, k=rng.randint(1, 3))):
            rationale, phrasings = EVIDENCE[symptom]
            body.append(_Sentence(_vary(rng, rng.choice(phrasings)), symptoms=(symptom,)))
        if rng.random() < 0.12:
            text, both = rng.choice(MULTI_EVIDENCE)
            body.append(_Sentence(text, symptoms=both))
    for _ in range(rng.choice([0, 1, 1, 2])):
        symptom = rng.choice(symptoms)
        sentence = _Sentence(rng.choice(HARD_NEGATIVES[symptom]))
        if rng.random() < 0.3:
            sentence.rejected = symptom
        body.append(sentence)
    if rng.random() < 0.3:
        text, symptom = rng.choice(NEGATED)
        body.append(_Sentence(text, rejected=symptom if rng.random() < 0.5 else None))
    if rng.random() < 0.04:
        text, rationale = rng.choice(SPECIAL_CASES)
        body.append(_Sentence(text, special=rationale))
    rng.shuffle(body)
    intro = [_Sentence(t) for t in rng.sample(NEUTRAL, rng.choice([1, 1, 2]))]
    outro = [_Sentence(t) for t in rng.sample(NEUTRAL, rng.choice([0, 1, 1]))]
    sentences = intro + body + outro
    # Deduplicate within the post (two draws of the same filler line).
    seen: set[str] = set()
    unique = [s for s in sentences if not (s.text in seen or seen.add(s.text))]
    for s in unique:
        if s.symptoms and rng.random() < 0.05:
            s.run_on = rng.choice(RUN_ON_LEADS)
        elif s.symptoms and rng.random() < 0.08:
            s.annotated_text = "  " + s.text.upper() + " "  # annotator's spacing/case differs
    return unique


def _post_text(rng: random.Random, sentences: list[_Sentence]) -> str:
    parts: list[str] = []
    for i, s in enumerate(sentences):
        text = f"{s.run_on} {s.text[0].lower()}{s.text[1:]}" if s.run_on else s.text
        if i:
            # Reddit style: paragraphs, and sentences without final punctuation end their line.
            ends = parts[-1].rstrip()[-1:]
            if ends not in ".!?" or rng.random() < 0.15:
                parts.append("\n\n" if rng.random() < 0.5 else "\n")
            else:
                parts.append(" ")
        parts.append(text)
    return "".join(parts)


def generate(n_posts: int = DEFAULT_POSTS, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Return the three files' contents (name -> text)."""
    if n_posts < 10:
        raise ValueError(f"--posts: need at least 10 posts, got {n_posts}")
    rng = random.Random(seed)
    posts = io.StringIO()
    annotations = io.StringIO()
    post_writer = csv.writer(posts, lineterminator="\n")
    ann_writer = csv.writer(annotations, lineterminator="\n")
    post_writer.writerow(["post_id", "text"])
    ann_writer.writerow(
        ["post_id", "sentence_id", "sentence_text", "DSM5_symptom", "status", "explanation"]
    )
    for n in range(n_posts):
        post_id = f"s_{1000 + 7 * n}_{rng.randint(1, 40)}"
        # Every tenth post carries evidence for a symptom in turn, so all nine always occur.
        sentences = _post_sentences(rng, with_evidence=n % 10 == 0 or rng.random() < 0.6)
        if n % 10 == 0:
            symptom = list(EVIDENCE)[(n // 10) % len(EVIDENCE)]
            if not any(symptom in s.symptoms for s in sentences):
                sentences.insert(1, _Sentence(rng.choice(EVIDENCE[symptom][1]), (symptom,)))
        post_writer.writerow([post_id, _post_text(rng, sentences)])
        for index, s in enumerate(sentences):
            sentence_id = f"{post_id}_{index}"
            text = s.annotated_text or s.text
            for symptom in s.symptoms:
                ann_writer.writerow([post_id, sentence_id, text, symptom, 1, EVIDENCE[symptom][0]])
            if s.rejected:
                ann_writer.writerow([post_id, sentence_id, s.text, s.rejected, 0,
                                     "Mentions the topic but is not evidence of the symptom."])
            if s.special:
                ann_writer.writerow([post_id, sentence_id, s.text, SPECIAL_CASE, 1, s.special])
    criteria = {"criteria": [{"id": cid, "symptom": symptom, "text": CRITERION_TEXTS[cid]}
                             for cid, symptom in CRITERION_SYMPTOMS.items()]}
    return {
        POSTS_FILE: posts.getvalue(),
        ANNOTATIONS_FILE: annotations.getvalue(),
        CRITERIA_FILE: json.dumps(criteria, indent=2, ensure_ascii=False) + "\n",
    }


def write(out_dir: Path, n_posts: int = DEFAULT_POSTS, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write the sample files into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate(n_posts, seed).items():
        path = out_dir / name
        path.write_bytes(text.encode("utf-8"))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder to write (default: paths.data_dir of {PARAMS_FILE})")
    parser.add_argument("--posts", type=int, default=DEFAULT_POSTS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing when the folder exists (e.g. holds the real corpus)")
    args = parser.parse_args()
    out = args.out or Path(load_params().paths.data_dir)
    if args.if_missing and out.exists():
        print(f"{out} exists: sample data not written")
        return
    try:
        for path in write(out, args.posts, args.seed):
            print(f"wrote {path}")
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
