"""Chat prompts of different lengths used by the real-weights tests."""

USER_MESSAGES = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 10 and explain how you know they are prime.",
    "Translate 'good morning, how are you today?' into Spanish and German.",
    "A farmer has 17 sheep and all but 9 run away. How many sheep does the farmer have left? Think step by step.",
    "Explain the difference between a list and a tuple in Python, with a short code example for each, "
    "and say when you would choose one over the other in a real program.",
    "You are planning a three-day trip to Rome on a small budget. Suggest an itinerary with one museum, "
    "one historical site and one food experience per day, and estimate the total cost in euros. "
    "Keep the answer short and use bullet points.",
]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
