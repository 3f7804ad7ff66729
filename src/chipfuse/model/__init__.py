"""Models chipfuse trains, and what they cost."""
