"""The paper and everything it is made of: document model, renderers, figures, facts, verify."""
