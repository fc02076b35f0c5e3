"""Placeholder until the corpus lands; replaced by the full CPU quickstart."""

if __name__ == "__main__":
    import mixtune

    print(f"mixtune {mixtune.__version__}")
