"""Draw the two sample inputs for the seed's example edit (run once; outputs are committed).

"Replace the suit in the first image with the clothes in the second image."
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (384, 512)


def person_in_suit() -> Image.Image:
    """A simple figure of a person in a dark suit."""
    img = Image.new("RGB", SIZE, (226, 232, 240))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 430, 384, 512), fill=(190, 196, 204))  # floor
    skin, suit, shirt = (236, 196, 160), (34, 38, 52), (245, 245, 245)
    d.ellipse((152, 48, 232, 138), fill=skin, outline=(120, 90, 70), width=2)  # head
    d.pieslice((150, 40, 234, 110), 180, 360, fill=(70, 45, 30))  # hair
    d.ellipse((172, 84, 182, 94), fill=(40, 40, 40))
    d.ellipse((202, 84, 212, 94), fill=(40, 40, 40))
    d.arc((178, 100, 206, 120), 20, 160, fill=(150, 60, 60), width=2)
    d.rectangle((180, 136, 204, 156), fill=skin)  # neck
    d.polygon([(120, 160), (264, 160), (276, 330), (108, 330)], fill=suit)  # jacket
    d.polygon([(176, 158), (208, 158), (192, 230)], fill=shirt)  # shirt
    d.polygon([(187, 166), (197, 166), (200, 220), (192, 232), (184, 220)], fill=(130, 20, 30))
    d.line([(176, 158), (192, 250)], fill=(70, 76, 96), width=3)  # lapels
    d.line([(208, 158), (192, 250)], fill=(70, 76, 96), width=3)
    for y in (262, 290):
        d.ellipse((188, y, 196, y + 8), fill=(90, 90, 100))  # buttons
    d.polygon([(120, 162), (96, 310), (116, 316), (138, 200)], fill=suit)  # arms
    d.polygon([(264, 162), (288, 310), (268, 316), (246, 200)], fill=suit)
    d.ellipse((94, 306, 118, 330), fill=skin)
    d.ellipse((266, 306, 290, 330), fill=skin)
    d.rectangle((130, 330, 186, 450), fill=(28, 30, 40))  # trousers
    d.rectangle((198, 330, 254, 450), fill=(28, 30, 40))
    d.ellipse((120, 440, 188, 462), fill=(15, 15, 15))  # shoes
    d.ellipse((196, 440, 264, 462), fill=(15, 15, 15))
    return img


def red_jacket() -> Image.Image:
    """A simple red jacket laid flat."""
    img = Image.new("RGB", SIZE, (248, 246, 240))
    d = ImageDraw.Draw(img)
    red, dark = (200, 30, 40), (140, 18, 26)
    d.polygon([(112, 110), (272, 110), (286, 390), (98, 390)], fill=red)  # body
    d.polygon([(112, 112), (50, 330), (82, 342), (140, 180)], fill=red)  # sleeves
    d.polygon([(272, 112), (334, 330), (302, 342), (244, 180)], fill=red)
    d.rectangle((46, 328, 86, 350), fill=dark)  # cuffs
    d.rectangle((298, 328, 338, 350), fill=dark)
    d.polygon([(160, 104), (224, 104), (192, 160)], fill=(248, 246, 240))  # neck opening
    d.polygon([(150, 104), (192, 170), (170, 200), (138, 120)], fill=dark)  # collar
    d.polygon([(234, 104), (192, 170), (214, 200), (246, 120)], fill=dark)
    d.line([(192, 170), (192, 390)], fill=(110, 110, 110), width=3)  # zip
    d.rectangle((118, 290, 166, 330), outline=dark, width=3)  # pockets
    d.rectangle((218, 290, 266, 330), outline=dark, width=3)
    d.rectangle((98, 376, 286, 392), fill=dark)  # hem
    return img


def main() -> None:
    """Write both samples next to this script."""
    for name, image in (
        ("dreamomni2-input-1.jpg", person_in_suit()),
        ("dreamomni2-input-2.jpg", red_jacket()),
    ):
        path = HERE / name
        image.save(path, format="JPEG", quality=85, optimize=True)
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
