"""The recipe: its schema, YAML loading, errors with file:line, and the rules across sections."""
