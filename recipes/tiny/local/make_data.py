"""Synthetic utterances for the tiny recipe: made here, nothing downloaded.

Each utterance is one second of 16 kHz audio whose pitch and loudness follow
its transcript (a few letters), so the data are deterministic and a model can
learn something from them. Writes ``<out>/wav/*.wav``, ``<out>/data.list``
(WeNet's raw format) and ``<out>/lang_char.txt``.

    python local/make_data.py data/tiny [--num_utts 16]
"""

import argparse
import json
import math
import random
import struct
import wave
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwx"  # 24 letters + 3 special symbols = 27
RATE = 16000


def synthesize(text: str) -> bytes:
    frames = []
    per_letter = RATE // len(text)
    for i, letter in enumerate(text):
        freq = 200 + 40 * LETTERS.index(letter)
        for n in range(per_letter):
            t = (i * per_letter + n) / RATE
            frames.append(int(8000 * math.sin(2 * math.pi * freq * t)))
    return struct.pack(f"<{len(frames)}h", *frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num_utts", type=int, default=16)
    args = parser.parse_args()
    (args.out / "wav").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(args.out / "data.list", "w") as data_list:
        for i in range(args.num_utts):
            text = "".join(rng.choice(LETTERS[:8]) for _ in range(rng.randint(2, 4)))
            wav = (args.out / "wav" / f"utt{i:03d}.wav").resolve()
            with wave.open(str(wav), "wb") as f:
                f.setnchannels(1)
                f.setsampwidth(2)
                f.setframerate(RATE)
                f.writeframes(synthesize(text))
            data_list.write(json.dumps({"key": f"utt{i:03d}", "wav": str(wav), "txt": text}) + "\n")
    symbols = ["<blank>", "<unk>", "<sos/eos>", *LETTERS]
    (args.out / "lang_char.txt").write_text("".join(f"{s} {i}\n" for i, s in enumerate(symbols)))


if __name__ == "__main__":
    main()
