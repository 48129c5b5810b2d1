"""Chat prompts shared by the benchmarks."""

from __future__ import annotations

QUESTIONS = [
    "Can my landlord keep my deposit?",
    "How do I make new friends?",
    "What should I cook for dinner?",
    "Is it safe to swim after eating?",
    "How can I sleep better at night?",
    "What is a good hobby for winter?",
    "How do I fix a flat bike tire?",
    "Should I learn piano or guitar?",
    "Why is the sky blue during the day?",
    "How often should I water a cactus?",
    "What makes a good job interview?",
    "How do I start running every day?",
]
