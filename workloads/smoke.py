"""A handful of short prompts written for this project, for smoke runs and quick checks.

Real prompt sets (HumanEval, MT-Bench, ...) are fetched from the package registry by the
workload loaders; these few exist so that a check can run before any set is downloaded.
"""

SMOKE_PROMPTS: list[dict] = [
    {"id": "smoke-code-1", "category": "code",
     "turns": ["Write a Python function that returns the n-th Fibonacci number iteratively."]},
    {"id": "smoke-code-2", "category": "code",
     "turns": ["Write a Python function is_palindrome(s) that ignores case and spaces."]},
    {"id": "smoke-code-3", "category": "code",
     "turns": ["Implement binary search over a sorted list in Python and explain its complexity."]},
    {"id": "smoke-prose-1", "category": "prose",
     "turns": ["Explain in two sentences why the sky looks blue."]},
    {"id": "smoke-prose-2", "category": "prose",
     "turns": ["Give three tips for writing clear commit messages."]},
]
