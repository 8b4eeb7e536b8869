"""What the papers of this project share."""
