"""Built-in seed prompts for teacher-sampled corpora: a few thousand distinct English chat prompts (programming among
them), built from task templates x topic lists, in a fixed shuffled order (so any prefix mixes every kind of task).

Each task kind pairs a few phrasings with the topic list that makes sense for it (a how-to gets activities, a
story gets subjects), so every combination reads like something a person would ask.
"""
from __future__ import annotations

import itertools
import random

CONCEPTS = [
    "photosynthesis", "inflation", "black holes", "the water cycle", "machine learning", "compound interest",
    "the immune system", "climate change", "democracy", "supply and demand", "gravity", "the internet",
    "vaccines", "plate tectonics", "renewable energy", "the stock market", "evolution", "DNA", "electricity",
    "the French Revolution", "the Roman Empire", "the printing press", "sleep", "memory", "recycling",
    "encryption", "blockchain", "the placebo effect", "opportunity cost", "the scientific method", "volcanoes",
    "ocean tides", "the seasons", "rainbows", "nuclear power", "antibiotics", "the greenhouse effect",
    "social media algorithms", "credit scores", "taxes", "the Industrial Revolution", "photosynthesis in algae",
    "the human heart", "bacteria", "earthquakes", "the moon's phases", "solar panels", "electric cars",
    "cloud computing", "the Renaissance", "habits", "stress", "meditation", "nutrition labels", "caffeine",
    "jet lag", "thunderstorms", "coral reefs", "bees and pollination", "the Great Wall of China",
    "the theory of relativity", "probability", "statistics", "algorithms", "the periodic table", "magnets",
    "sound waves", "light", "the brain", "languages and dialects", "money", "banks", "insurance", "mortgages",
    "the Olympic Games", "jazz music", "impressionist painting", "poetry", "public libraries", "time zones",
]

ACTIVITIES = [
    "learn to cook simple meals", "start running", "save money each month", "learn a new language",
    "grow tomatoes on a balcony", "write a good resume", "prepare for a job interview",
    "make new friends in a new city",
    "improve my sleep", "organize my closet", "start a small business", "learn to play the guitar",
    "take better photos with my phone", "plan a trip on a budget", "bake bread at home", "keep a houseplant alive",
    "study for an exam", "give a presentation", "stop procrastinating", "learn to program in Python",
    "train a puppy", "clean a kitchen quickly", "make a budget", "negotiate a salary", "read more books",
    "start journaling", "change a flat tire", "paint a room", "write a short story", "reduce screen time",
    "cook rice perfectly", "make a good cup of coffee", "plan a birthday party", "learn to swim as an adult",
    "meditate", "declutter my home", "set goals for the year", "back up my computer", "choose a laptop",
    "host a dinner party", "deal with a difficult coworker", "stay motivated while working from home",
    "learn to draw", "start a vegetable garden", "write a thank-you note", "prepare for a marathon",
    "teach a child to ride a bike", "make a podcast", "compost kitchen scraps", "improve my handwriting",
]

SUBJECTS = [
    "a lighthouse keeper", "a lost robot", "a dragon who is afraid of fire", "a small village by the sea",
    "a detective cat", "two friends on a road trip", "a girl who can talk to birds", "a time traveler",
    "an old clock", "a baker who opens a shop", "an astronaut far from home", "a rainy afternoon",
    "a forgotten library", "a kind giant", "a school science fair", "a fox and a crow", "the first snow of winter",
    "a musician on the street", "a secret garden", "a family moving to a new country", "a brave little boat",
    "a grandmother's recipe", "a city at night", "a penguin who wants to fly", "a mystery in a museum",
    "a talking tree", "a lost key", "a summer camp", "a train that never stops", "a teacher's last day",
]

AUDIENCES = ["my manager", "a customer", "my landlord", "a teacher", "a colleague", "a friend", "a neighbor",
             "the school principal", "a new client", "my team"]
SITUATIONS = ["a delayed project", "a meeting next week", "a broken heater", "a refund request", "taking a day off",
              "a thank-you for their help", "a change of plans", "a missed deadline", "a job offer",
              "an invitation to lunch", "a noisy party next door", "feedback on a report"]

PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("renting", "buying a home"), ("Python", "JavaScript"),
    ("trains", "planes"), ("reading books", "listening to audiobooks"), ("the city", "the countryside"),
    ("solar power", "wind power"), ("a laptop", "a tablet"), ("running", "cycling"), ("stocks", "bonds"),
    ("email", "instant messaging"), ("working from home", "working in an office"), ("paper books", "e-readers"),
    ("weather", "climate"), ("a virus", "bacteria"), ("speed", "velocity"), ("saving", "investing"),
    ("baking", "frying"), ("democracy", "monarchy"), ("a lake", "a sea"), ("summer", "winter"),
    ("public schools", "private schools"), ("credit cards", "debit cards"), ("mountains", "beaches"),
]

COLLECTIONS = [
    "healthy breakfast ideas", "ways to reduce stress", "good habits for students", "tips for a long flight",
    "questions to ask in a job interview", "fun things to do on a rainy day", "ways to save energy at home",
    "classic novels worth reading", "easy dinners for busy weeknights", "ways to be more productive",
    "hobbies that are cheap to start", "things to pack for a camping trip", "common grammar mistakes",
    "ways to practice gratitude", "gift ideas for a grandparent", "board games for a family evening",
    "ways to make a small room look bigger", "tips for learning vocabulary", "safety tips for hiking",
    "signs that a plant needs more water", "ways to help the environment", "tips for writing clear emails",
    "exercises you can do at your desk", "ways to start a conversation", "snacks that are good for energy",
]

FEELINGS = ["tired", "nervous", "bored", "excited", "a bit lonely", "overwhelmed", "happy", "stuck"]
REASONS = ["I have a big exam tomorrow", "I just moved to a new city", "work has been busy", "it is the weekend",
           "I started a new job", "my friend is visiting", "I can't decide what to do next", "it has rained all week"]

EXPLAIN = ["Explain {} in simple terms.", "What is {} and why does it matter?", "Can you explain the basics of {}?",
           "Give me a short overview of {}.", "Explain {} to a ten-year-old.", "What are common misconceptions "
           "about {}?", "Write a short paragraph about {} for a school report.", "What is the history of {}?",
           "Give an everyday example of {}.", "What are three interesting facts about {}?",
           "How would you teach {} to a friend?"]
HOWTO = ["How do I {}?", "What are the steps to {}?", "Give me some tips to {}.",
         "I'm a complete beginner. How should I start to {}?", "What mistakes should I avoid when I try to {}?",
         "Make me a one-week plan to {}.", "Explain how to {} in five steps."]
STORY = ["Write a short story about {}.", "Tell me a bedtime story about {}.", "Write a poem about {}.",
         "Write the opening paragraph of a novel about {}.", "Write a funny story about {}.",
         "Describe a day in the life of {}."]
EMAIL = ["Write a polite email to {} about {}.", "Write a short message to {} about {}.",
         "Help me write a friendly note to {} about {}."]
COMPARE = ["What are the differences between {} and {}?", "Compare {} and {}: which is better, and when?",
           "What are the pros and cons of {} versus {}?"]
LISTS = ["List five {}.", "What are some {}?", "Give me ten {}, with one sentence each.",
         "Suggest a few {} and explain why."]
SUMMARY = ["Summarize the main ideas of {} in three sentences.", "Give me the key facts about {} as bullet points.",
           "What should everyone know about {}? Keep it short."]
CHAT = ["I feel {} today because {}. Any advice?", "I'm {} and {}. What could I do this evening?",
        "Hi! I'm feeling {} since {}. Can we talk for a bit?"]

DISHES = ["pancakes", "tomato soup", "a vegetable curry", "banana bread", "a simple salad", "fried rice",
          "chocolate chip cookies", "lentil stew", "guacamole", "an omelette", "spaghetti with garlic and oil",
          "roasted vegetables", "a fruit smoothie", "homemade pizza", "chicken noodle soup", "hummus"]
RECIPE = ["Give me a simple recipe for {}.", "How do I make {} without special equipment?",
          "What can I add to {} to make it healthier?"]

DECISIONS = ["moving to another city for a job", "buying a used car", "learning to code at 40", "getting a dog",
             "going back to school", "working a four-day week", "living alone", "taking a gap year",
             "switching to a plant-based diet", "buying an electric bike", "freelancing", "joining a gym",
             "having a smartphone-free weekend", "starting a side project", "studying abroad"]
ADVICE = ["What are the pros and cons of {}?", "I'm thinking about {}. What should I consider first?",
          "Is {} a good idea? Give me both sides."]

SENTENCES = ["me and him goes to the store yesterday", "the meeting have been moved to next tuesday",
             "i want that you send me the file", "we was very happy with the results of the test",
             "can u tell me when the shop open", "this product is not good and i want my money back now",
             "their going to be late because of the traffic", "the report it was finished by the team last week",
             "i has three brother and one sister", "please to find attached the document you asked"]
REWRITE = ["Fix the grammar in this sentence: \"{}\"", "Rewrite this to sound more formal: \"{}\"",
           "Rewrite this more politely: \"{}\"", "Correct the spelling and punctuation: \"{}\""]

QUESTIONS = [
    "Why is the sky blue?", "Why do cats purr?", "How far away is the Moon?", "Why do leaves change color in autumn?",
    "How do airplanes stay in the air?", "Why do we dream?", "What makes a good friend?", "How are rainbows formed?",
    "Why is sleep important?", "How does a refrigerator keep food cold?", "What causes the wind?",
    "Why do onions make you cry?", "How do birds know where to migrate?", "What is the tallest mountain on Earth?",
    "How does a compass work?", "Why is the ocean salty?", "How do bees make honey?", "What is a good way to "
    "start the day?", "What is the difference between a hobby and a passion?", "Why do we have leap years?",
    "How do vaccines train the immune system?", "What is the best way to learn math?", "Why do stars twinkle?",
    "How does a bicycle stay upright?", "What should I know before adopting a cat?", "Why do we yawn?",
    "How does soap clean things?", "What makes bread rise?", "How do noise-cancelling headphones work?",
    "Why do we get goosebumps?",
]

# programming: instruct models are asked for code as often as for anything else, and a student that never sees code
# in its recovery corpus loses it (bench/README.md, chat_val_composition.py: the calibrated KV cut costs code most)
PROGRAMS = [
    "reverses a string", "checks whether a number is prime", "counts how often each word appears in a text",
    "returns the largest number in a list", "removes duplicates from a list but keeps the order",
    "checks whether a string is a palindrome", "converts Celsius to Fahrenheit",
    "computes the average of a list of numbers", "merges two sorted lists into one sorted list",
    "finds the second largest number in a list", "flattens a nested list", "checks whether two words are anagrams",
    "counts the vowels in a string", "returns the n-th Fibonacci number", "sums the digits of a number",
    "checks that a password has at least 8 characters and one digit", "splits a list into chunks of a given size",
    "finds the most common element in a list", "capitalizes the first letter of every word",
    "computes the greatest common divisor of two numbers", "converts a binary string to an integer",
    "counts the lines of a text file", "sorts a list of dictionaries by a given key", "rotates a list by k places",
    "checks whether a year is a leap year", "finds all pairs in a list that add up to a target",
    "generates a random password", "calculates compound interest",
    "formats a number of seconds as hours, minutes and seconds", "transposes a matrix given as a list of lists",
]
LANGUAGES = ["Python", "JavaScript"]
PROGRAM = ["Write a {} function that {}.", "How do I write a {} program that {}?",
           "Show me {} code that {}, with a short explanation."]
STRUCTURES = ["a stack", "a linked list", "a binary search tree", "a class for a bank account", "a min-heap",
              "a cache with a size limit", "a class for a to-do list", "a simple text-based menu"]
BUILD = ["Implement {} in Python.", "Show me how to build {} in Python, with an example of using it.",
         "Explain how {} works and give a short Python example."]
CODE_QUESTIONS = [
    "What is the difference between a list and a tuple in Python?", "What does the yield keyword do in Python?",
    "How do I handle exceptions in Python?", "What is a closure in JavaScript?", "How do I read a JSON file in Python?",
    "What is recursion? Show a small example in Python.", "How do I loop over an object's keys in JavaScript?",
    "What do async and await do in JavaScript?", "How do I write a unit test for a Python function?",
    "What is the difference between == and === in JavaScript?", "How do I remove an item from a dictionary in Python?",
    "How do I use map and filter on an array in JavaScript?",
]

OBJECTS = ["apples", "books", "marbles", "cookies", "pencils", "stickers", "oranges", "coins"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro"]


def _reasoning() -> list[str]:
    """Word problems with small numbers: many distinct prompts that ask for step-by-step reasoning."""
    out = []
    numbers = [(12, 5), (7, 3), (20, 8), (15, 6), (9, 4)]
    for i, (name, obj) in enumerate(itertools.product(NAMES, OBJECTS)):
        a, b = numbers[i % len(numbers)]
        out.append(f"{name} has {a} {obj} and gives {b} to a friend, then buys {a - b} more. How many {obj} does "
                   f"{name} have now? Explain your reasoning step by step.")
    for km, hours in itertools.product([60, 120, 150, 240, 300], [2, 3, 4]):
        out.append(f"A train travels {km} km in {hours} hours. What is its average speed? Show your work.")
    for price, pct in itertools.product([20, 45, 80, 120], [10, 15, 25, 50]):
        out.append(f"A jacket costs ${price} and is on sale for {pct}% off. What is the sale price? "
                   "Explain the steps.")
    return out


def programming_prompts() -> list[str]:
    """The seed prompts that ask for code (Python and JavaScript functions, data structures, questions)."""
    return ([t.format(lang, task) for t in PROGRAM for lang in LANGUAGES for task in PROGRAMS]
            + [t.format(x) for t in BUILD for x in STRUCTURES] + CODE_QUESTIONS)


def _build() -> list[str]:
    prompts = [t.format(c) for t in EXPLAIN for c in CONCEPTS]
    prompts += [t.format(a) for t in HOWTO for a in ACTIVITIES]
    prompts += [t.format(s) for t in STORY for s in SUBJECTS]
    prompts += [t.format(a, s) for t in EMAIL for a in AUDIENCES for s in SITUATIONS]
    prompts += [t.format(a, b) for t in COMPARE for a, b in PAIRS]
    prompts += [t.format(c) for t in LISTS for c in COLLECTIONS]
    prompts += [t.format(c) for t in SUMMARY for c in CONCEPTS]
    prompts += [t.format(f, r) for t in CHAT for f in FEELINGS for r in REASONS]
    prompts += [t.format(d) for t in RECIPE for d in DISHES]
    prompts += [t.format(d) for t in ADVICE for d in DECISIONS]
    prompts += [t.format(x) for t in REWRITE for x in SENTENCES]
    prompts += QUESTIONS
    prompts += _reasoning()
    prompts += programming_prompts()
    prompts = list(dict.fromkeys(prompts))  # distinct, first occurrence kept
    random.Random(0).shuffle(prompts)
    return prompts


def seed_prompts(limit: int | None = None) -> list[str]:
    """The built-in prompts (user turns), always in the same order; the first `limit` if given."""
    prompts = _build()
    return prompts if limit is None else prompts[:limit]
