"""Images: the one decode path for image inputs, framing and resizing, finding white cells, and
colour normalisation. Imports: basics only."""
