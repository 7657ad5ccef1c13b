"""Method-agnostic machinery: nothing in this package names a specific PEFT method."""
