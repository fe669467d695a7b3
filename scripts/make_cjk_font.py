"""Build webui/assets/tunebench-cjk.woff2: the CJK font the page falls back to.

Chinese and Japanese text must render on a machine with no CJK font installed (a fresh
server, a container), where a browser would otherwise draw empty boxes. A whole CJK font is
16-20 MB; the page needs the characters of its catalogues plus the common ones a user types
(GB 2312's first level, 3755 characters, covers about 99.7% of everyday Chinese text),
kana, CJK punctuation and full-width forms, which subset to about 1.5 MB.

Usage, after any catalogue change that adds characters (tests/test_i18n.py checks that the
font covers every catalogue):
    apt-get download fonts-noto-cjk && dpkg-deb -x fonts-noto-cjk_*.deb /tmp/noto
    python scripts/make_cjk_font.py /tmp/noto/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
The font is Noto Sans CJK SC (SIL Open Font License 1.1, webui/assets/OFL.txt).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "webui" / "assets" / "tunebench-cjk.woff2"
SC = "Noto Sans CJK SC"


def gb2312_level1() -> str:
    """GB 2312's first level: the 3755 most used characters, rows 16 to 55."""
    chars = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            try:
                chars.append(bytes([row, cell]).decode("gb2312"))
            except UnicodeDecodeError:
                pass  # row 55 ends early
    return "".join(chars)


def catalogue_chars() -> str:
    text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "core" / "locales").rglob("*.yaml"))
    return "".join(sorted({c for c in text if ord(c) > 0x2E7F}))


def ranges(*spans: tuple[int, int]) -> str:
    return "".join(chr(c) for lo, hi in spans for c in range(lo, hi + 1))


def wanted() -> str:
    return (gb2312_level1() + catalogue_chars()
            + ranges((0x3000, 0x303F), (0x3040, 0x30FF), (0xFF00, 0xFFEF), (0x2010, 0x2027)))


def main(ttc: str) -> None:
    fonts = TTCollection(ttc).fonts
    font = next(f for f in fonts if f["name"].getDebugName(4) == SC)
    options = subset.Options()
    options.flavor = "woff2"
    options.layout_features = ["*"]
    options.name_IDs = ["*"]
    options.notdef_outline = True
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=wanted())
    subsetter.subset(font)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    font.flavor = "woff2"
    font.save(OUT)
    print(f"{OUT}: {OUT.stat().st_size / 1e6:.2f} MB, {len(set(wanted()))} characters")


if __name__ == "__main__":
    main(sys.argv[1])
