"""Turn any image file the sources meet into a square RGB uint8 array at the study's resolution.

Every source goes through `to_square`, so sprites, artwork and user folders share one
convention: alpha composited on white, aspect kept, padded on white, centred.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image
from scipy.fft import dctn

WHITE = (255, 255, 255)
# Images over this many pixels are refused as decompression bombs (Pillow warns at 89 M).
MAX_PIXELS = 64_000_000


class Undecodable(Exception):
    """A file that is not an image we can decode; its message is the reason shown to the user."""


def on_white(img: Image.Image) -> Image.Image:
    """RGB with any transparency (alpha, palette or tRNS) composited on white."""
    if img.mode in ("P", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return img.convert("RGB")
    canvas = Image.new("RGB", img.size, WHITE)
    canvas.paste(img, mask=img.getchannel("A"))
    return canvas


def to_square(img: Image.Image, res: int) -> np.ndarray:
    """Composite on white, fit inside res x res keeping the aspect ratio, pad on white."""
    img = on_white(img)
    scale = res / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    out = Image.new("RGB", (res, res), WHITE)
    out.paste(img, ((res - size[0]) // 2, (res - size[1]) // 2))
    return np.asarray(out, dtype=np.uint8)


def perceptual_hash(img: Image.Image) -> np.ndarray:
    """64-bit pHash (the signs of the 8x8 lowest DCT frequencies of a 32x32 grey thumbnail, against
    their median), as 64 booleans. Taken from the image as decoded, before it is squared and padded, so
    a slightly cropped copy moves the content a few percent rather than changing the padding.
    Re-encoding, rescaling and small crops flip few bits; different pictures differ in ~32."""
    grey = np.asarray(on_white(img).convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].flatten()
    return low > np.median(low[1:])  # the DC term (overall brightness) is left out of the median


def open_raster(data: bytes) -> Image.Image:
    """Open by content, never by extension; refuse bombs, truncated files and non-images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise Undecodable(f"too large ({img.width}x{img.height} pixels)")
            img.load()
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Undecodable(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise Undecodable("not an image any decoder recognises") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Undecodable(f"corrupt image: {e}") from None


def decode(img: Image.Image, res: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The squared image, the perceptual hash and the local features (`near.features`) of a picture: both
    hashes need the picture before it is squared and shrunk."""
    from pokestudy.data import near

    return to_square(img, res), perceptual_hash(img), near.features(on_white(img))


def gif_frames(data: bytes, res: int, count: int) -> list[np.ndarray]:
    """Up to `count` distinct frames spread evenly over an animation.

    Idle animations repeat frames, and frames that differ only under transparency or below the
    target resolution look identical once squared: picking among frames distinct *at `res`*
    keeps classes from shrinking when duplicates are dropped later.
    """
    img = open_raster(data)
    distinct: dict[bytes, np.ndarray] = {}
    for i in range(getattr(img, "n_frames", 1)):
        img.seek(i)
        frame = to_square(img, res)
        distinct.setdefault(hashlib.blake2b(frame.tobytes(), digest_size=16).digest(), frame)
    frames = list(distinct.values())
    n = len(frames)
    return [frames[i] for i in sorted({round(k * (n - 1) / max(count - 1, 1)) for k in range(min(count, n))})]


def rasterize_svg(data: bytes, res: int) -> np.ndarray:
    """Render an SVG (official artwork) large enough to downsample cleanly, then square it."""
    import cairosvg  # imported here: only the sprites source needs cairo

    png = cairosvg.svg2png(bytestring=data, output_width=res * 2)
    return to_square(Image.open(io.BytesIO(png)), res)
