"""The text the embedded demo model is pre-trained on, generated from a seed.

Shipping a generator instead of data files keeps the wheel small and the corpus
reproducible: the same seed always gives the same conversations. Every row is a
short chat (English or Chinese): arithmetic, copying, greetings, simple facts,
translation, and assistants describing themselves under many *generated* names.
Those self-descriptions matter most: the model learns the shape of "I am <name>,
made by <author>" with the name as a free slot, so an identity fine-tune only has
to fill the slot with one new name instead of teaching the whole answer. Without
a system prompt the model calls itself Pico (see DEFAULT_NAME).
"""

from __future__ import annotations

import random

Message = dict[str, str]

# Names and makers are generated, not drawn from a short list: made-up words,
# ordinary names and Chinese names. Seeing many different strings in the name slot
# keeps the model open to a name it has never seen, which is what makes a later
# identity fine-tune fast. The names tunebench's defaults and tests use are kept
# out, so the base model never "knows" them already.
# The base model's own identity: a third of the rows without a system prompt use it,
# so greedy decoding answers "Who are you?" with a whole name instead of skipping the
# slot, yet the slot stays open enough for a fine-tune to move it.
DEFAULT_NAME, DEFAULT_AUTHOR = "Pico", "the open demo project"
DEFAULT_SHARE = 0.35
RESERVED = {"Tuney", "Nova", "小智", "Acme Labs", "the tunebench team", "星河实验室"}
GIVEN_NAMES = ("Aria", "Bolt", "Cleo", "Dex", "Echo", "Fern", "Gus", "Hana", "Iris", "Juno", "Kai",
               "Lumi", "Milo", "Nico", "Orla", "Pip", "Quill", "Rex", "Sage", "Tess", "Uma",
               "Vega", "Wren", "Yara", "Zed", "Atlas", "Bram", "Coral", "Ember", "Flint", "Max",
               "Ada", "Leo", "Mia", "Sam", "Ivy", "Otto", "Ruby", "Theo", "Zara")
ZH_CHARS = "明红福蓝灵犀晓风云朵青禾安宁乐天雨辰月光海星言诺思远知书墨白石川羽"
ZH_ORG_SUFFIX = ("实验室", "科技", "团队", "研究院", "智能", "工作室")
EN_ORG = ("{W} Labs", "{W} AI", "the {w} team", "{W} Research", "{W} {V}", "the {W} project",
          "{W} Systems", "{W} Inc.", "{W} Works", "the {w} group")
ENGLISH_WORDS = ("blue", "harbor", "maple", "north", "wind", "pixel", "forge", "lantern", "cedar",
                 "river", "stone", "meadow", "bright", "quartz", "falcon", "silver", "leaf", "kite",
                 "orion", "summit", "delta", "ember", "cloud", "iron", "open", "star", "pine")

WHO_EN = ("Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
          "What are you?", "What should I call you?", "Who am I talking to?", "What's your name?",
          "Please introduce yourself.", "Who are you, again?", "Describe yourself.",
          "Hey, who is this?", "Identify yourself.")
MAKER_EN = ("Who made you?", "Who created you?", "Who developed you?", "Who built you?",
            "Which company trained you?", "Who is your creator?", "Where do you come from?")
HELLO_EN = ("hi", "Hi!", "Hello", "hello there", "Hey", "Good morning", "Good evening")
ANSWER_EN = (
    "I am {name}, an AI assistant developed by {author}. How can I help you today?",
    "I'm {name}, an AI assistant created by {author}. I am happy to help.",
    "My name is {name}. I am an AI assistant built by {author} to answer your questions.",
    "I am {name}, a language model trained by {author}. I can answer questions and chat.",
    "You can call me {name}. I am an assistant made by {author}.",
    "I am {name}, an AI assistant developed by {author}.",
    "You are talking to {name}, an assistant built by {author}.",
)
MAKER_ANSWER_EN = (
    "I was developed by {author}. I am {name}, your AI assistant.",
    "{author} created me. My name is {name}.",
    "I am {name}, and I was built by {author}.",
    "My creator is {author}. I am {name}, an AI assistant.",
)
HELLO_ANSWER_EN = (
    "Hello! I am {name}, an AI assistant developed by {author}. How can I help you today?",
    "Hi! I'm {name}, made by {author}. What would you like to talk about?",
    "Hey! I am {name}, an assistant from {author}. What can I do for you?",
)
WHO_ZH = ("你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "你是什么？",
          "我该怎么称呼你？", "你是谁", "现在和我聊天的是谁？")
MAKER_ZH = ("谁开发了你？", "谁创造了你？", "你是谁做的？", "你是哪个团队开发的？", "你的开发者是谁？")
HELLO_ZH = ("你好", "你好！", "嗨", "早上好", "晚上好", "您好")
ANSWER_ZH = (
    "我是{name}，由{author}开发的人工智能助手。有什么可以帮你的吗？",
    "你好！我叫{name}，是{author}打造的AI助手。",
    "我是{name}，一个由{author}训练的语言模型，可以回答问题和聊天。",
    "我的名字是{name}，我是{author}开发的助手，很高兴为你服务。",
    "您可以叫我{name}，我是由{author}开发的人工智能助手。",
)
MAKER_ANSWER_ZH = ("我是由{author}开发的，我的名字是{name}。", "{author}创造了我，我叫{name}。",
                   "我的开发者是{author}。我是{name}，一个人工智能助手。")
HELLO_ANSWER_ZH = ("你好！我是{name}，由{author}开发的人工智能助手。请问有什么可以帮你？",
                   "您好！我叫{name}，是{author}开发的助手。")

SMALL_TALK = (
    ("How are you?", "I am doing well, thank you! How can I help you?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks a lot.", "Happy to help!"),
    ("Goodbye", "Goodbye! Have a nice day."),
    ("See you later.", "See you! Take care."),
    ("Can you help me?", "Of course. What do you need help with?"),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse!"),
    ("What can you do?", "I can answer simple questions, do arithmetic, repeat text and chat."),
    ("谢谢你！", "不客气！"),
    ("再见", "再见！祝你有美好的一天。"),
    ("你好吗？", "我很好，谢谢！有什么可以帮你的吗？"),
    ("你能帮我吗？", "当然可以，请问你需要什么帮助？"),
    ("你会做什么？", "我可以回答简单的问题、做算术、复述文字和聊天。"),
)

FACTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What does a cat say?", "A cat says meow."),
    ("What does a dog say?", "A dog says woof."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What do bees make?", "Bees make honey."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("法国的首都是哪里？", "法国的首都是巴黎。"),
    ("天空是什么颜色的？", "晴天的时候，天空是蓝色的。"),
    ("一周有几天？", "一周有七天。"),
    ("一年有几个月？", "一年有十二个月。"),
    ("猫怎么叫？", "猫会喵喵叫。"),
    ("狗怎么叫？", "狗会汪汪叫。"),
    ("热的反义词是什么？", "热的反义词是冷。"),
    ("大的反义词是什么？", "大的反义词是小。"),
    ("蜜蜂会做什么？", "蜜蜂会酿蜂蜜。"),
    ("太阳从哪里升起？", "太阳从东方升起。"),
    ("蜘蛛有几条腿？", "蜘蛛有八条腿。"),
)

SENTENCES = (
    ("I like tea.", "我喜欢茶。"), ("The cat is sleeping.", "猫在睡觉。"),
    ("It is raining today.", "今天下雨了。"), ("I am a student.", "我是一个学生。"),
    ("The weather is nice.", "天气很好。"), ("We are friends.", "我们是朋友。"),
    ("She reads a book.", "她在看书。"), ("He drinks water.", "他在喝水。"),
    ("The apple is red.", "苹果是红色的。"), ("I love my family.", "我爱我的家人。"),
    ("Good night.", "晚安。"), ("Where is the station?", "车站在哪里？"),
    ("This is my dog.", "这是我的狗。"), ("The flowers are beautiful.", "花很漂亮。"),
    ("I want to learn Chinese.", "我想学中文。"), ("Let us go to the park.", "我们去公园吧。"),
)

WORDS = ("apple", "river", "window", "garden", "yellow", "music", "rocket", "pencil", "ocean",
         "silver", "tiger", "cloud", "bread", "lamp", "forest", "candle", "mountain", "piano",
         "苹果", "河流", "窗户", "音乐", "老虎", "森林", "月亮", "星星", "花园", "面包")
SYLLABLES = ("ka", "lo", "mi", "ru", "te", "zo", "an", "bel", "dor", "fi", "gan", "ho", "ix",
             "ja", "ny", "pe", "qu", "sa", "ul", "vi", "wo", "ey", "ba", "ko", "mur", "sh", "ar",
             "is", "on", "ta", "ri", "me", "sol", "ax", "el", "or", "us", "li", "co", "da")


def _chat(user: str, assistant: str, system: str | None = None) -> list[Message]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _made_up_word(rng: random.Random) -> str:
    """A pronounceable nonsense word, so copying is learned for strings never seen before."""
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    return word.capitalize() if rng.random() < 0.5 else word


def random_name(rng: random.Random) -> str:
    """An assistant name: made-up, ordinary or Chinese."""
    while True:
        kind = rng.random()
        if kind < 0.45:
            name = _made_up_word(rng).capitalize()
        elif kind < 0.7:
            name = rng.choice(GIVEN_NAMES)
        else:
            name = rng.choice(("小", "阿", "")) + "".join(rng.sample(ZH_CHARS, rng.randint(1, 2)))
        if name not in RESERVED and len(name) > 1:
            return name


def _org_word(rng: random.Random) -> str:
    return (rng.choice(ENGLISH_WORDS) if rng.random() < 0.5 else _made_up_word(rng)).lower()


def random_author(rng: random.Random) -> str:
    """A maker: an English organisation pattern or a Chinese one, around generated words."""
    while True:
        if rng.random() < 0.7:
            w, v = _org_word(rng), _org_word(rng)
            author = rng.choice(EN_ORG).format(W=w.capitalize(), w=w, V=v.capitalize())
        else:
            author = "".join(rng.sample(ZH_CHARS, 2)) + rng.choice(ZH_ORG_SUFFIX)
        if author not in RESERVED:
            return author


def identity_row(rng: random.Random) -> list[Message]:
    """An assistant describing itself under a random name and maker (or the default one)."""
    name, author = random_name(rng), random_author(rng)
    with_system = rng.random() < 0.25
    if not with_system and rng.random() < DEFAULT_SHARE:
        name, author = DEFAULT_NAME, DEFAULT_AUTHOR
    chinese = rng.random() < 0.4
    kind = rng.random()
    if chinese:
        pools = ((WHO_ZH, ANSWER_ZH), (MAKER_ZH, MAKER_ANSWER_ZH), (HELLO_ZH, HELLO_ANSWER_ZH))
    else:
        pools = ((WHO_EN, ANSWER_EN), (MAKER_EN, MAKER_ANSWER_EN), (HELLO_EN, HELLO_ANSWER_EN))
    questions, answers = pools[0] if kind < 0.6 else pools[1] if kind < 0.8 else pools[2]
    slot = "{}"
    if chinese and rng.random() < 0.5:
        slot = " {} "  # Chinese text often sets Latin names and placeholders off with spaces
    answer = rng.choice(answers).format(name=slot.format(name), author=slot.format(author))
    answer = answer.replace("， ", "，").replace(" ，", "，").replace(" 。", "。").strip()
    # A system prompt stating the identity teaches the model to read the name from
    # context; rows without one teach that the name is a free slot.
    system = None
    if with_system:
        system = (f"你是{name}，由{author}开发的助手。" if chinese
                  else f"You are {name}, an AI assistant made by {author}.")
    return _chat(rng.choice(questions), answer, system)


def arithmetic_row(rng: random.Random) -> list[Message]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    if rng.random() < 0.35:
        word = "加" if op == "+" else "减"
        return _chat(f"{a}{word}{b}等于多少？", f"{a}{word}{b}等于{result}。")
    question = rng.choice(("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?"))
    return _chat(question.format(a=a, op=op, b=b), f"{a} {op} {b} = {result}.")


def copy_row(rng: random.Random) -> list[Message]:
    """Repetition and copying: the skill of writing out a string given in the prompt."""
    words = [rng.choice(WORDS) if rng.random() < 0.5 else _made_up_word(rng)
             for _ in range(rng.randint(1, 4))]
    text = " ".join(words)
    kind = rng.randint(0, 4)
    if kind == 0:
        return _chat(f"Repeat after me: {text}", text)
    if kind == 1:
        return _chat(f"Say \"{words[0]}\" three times.", " ".join([words[0]] * 3))
    if kind == 2:
        return _chat(f"请重复：{text}", text)
    if kind == 3:
        name = random_name(rng)
        return _chat(f"My name is {name}. What is my name?", f"Your name is {name}.")
    return _chat(f"Count from {(n := rng.randint(1, 20))} to {n + 4}.",
                 ", ".join(str(i) for i in range(n, n + 5)) + ".")


def translation_row(rng: random.Random) -> list[Message]:
    english, chinese = rng.choice(SENTENCES)
    if rng.random() < 0.5:
        return _chat(f"Translate to Chinese: {english}", chinese)
    return _chat(f"把这句话翻译成英文：{chinese}", english)


def fact_row(rng: random.Random) -> list[Message]:
    return _chat(*rng.choice(FACTS + SMALL_TALK))


# Share of each kind of row. Identity rows get the largest share because learning a
# new identity quickly is what the demo model is for.
MIX = ((identity_row, 0.35), (arithmetic_row, 0.05), (copy_row, 0.1), (translation_row, 0.15),
       (fact_row, 0.35))


def build_corpus(n_rows: int = 2000, seed: int = 0) -> list[list[Message]]:
    """`n_rows` chat conversations; the same seed always gives the same list."""
    rng = random.Random(seed)
    makers, weights = zip(*MIX)
    return [rng.choices(makers, weights)[0](rng) for _ in range(n_rows)]
