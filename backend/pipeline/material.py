"""The material's constant metallic and roughness factors, from the prompt's words.

The colour map is baked from views; metallic and roughness are not measured. By
default a generated asset is a rough dielectric (metallic 0, roughness 0.8). Where
the prompt names a material, the factors follow a table of common physically based
values for it (metals metallic 1; glass, chrome, glazed and lacquered things low roughness),
the word nearest the start of the prompt winning ("a wooden chair with steel legs"
is wood). This reads words, not pixels: the text prior is not asked. An explicit
``metallic`` or ``roughness`` in the request wins over both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_METALLIC = 0.0
DEFAULT_ROUGHNESS = 0.8

# word -> (metallic, roughness); plural and adjective forms listed where they differ
MATERIAL_WORDS: dict[str, tuple[float, float]] = {
    **{w: (1.0, 0.35) for w in ("metal", "metallic", "steel", "iron", "aluminium", "aluminum", "tin", "pewter",
                                 "titanium")},
    **{w: (1.0, 0.3) for w in ("gold", "golden", "silver", "brass", "copper", "bronze")},
    **{w: (1.0, 0.15) for w in ("chrome", "chromed")},
    **{w: (1.0, 0.7) for w in ("rusty", "rusted", "cast-iron")},
    **{w: (0.0, 0.7) for w in ("wood", "wooden", "timber", "oak", "pine", "walnut", "bamboo")},
    **{w: (0.0, 0.45) for w in ("plastic", "vinyl", "lego")},
    **{w: (0.0, 0.25) for w in ("ceramic", "porcelain", "glazed", "enamel", "lacquered")},
    **{w: (0.0, 0.05) for w in ("glass", "crystal", "ice")},
    **{w: (0.0, 0.9) for w in ("stone", "rock", "concrete", "brick", "clay", "terracotta", "plaster",
                                "sand", "dirt")},
    **{w: (0.0, 0.3) for w in ("marble", "jade")},
    **{w: (0.0, 0.95) for w in ("fabric", "cloth", "wool", "woolen", "knitted", "felt", "cotton", "plush", "velvet",
                                 "fur", "furry")},
    **{w: (0.0, 0.55) for w in ("leather",)},
    **{w: (0.0, 0.85) for w in ("rubber", "paper", "cardboard")},
}


@dataclass
class MaterialFactors:
    metallic: float
    roughness: float
    source: str  # "request", the word they came from, or "default"


def material_factors(prompt: str = "", metallic: float | None = None, roughness: float | None = None) -> MaterialFactors:
    """Metallic and roughness for an asset: the request's values where given (not None and
    not negative), else the table's for the prompt's first material word, else the defaults."""
    found = None
    for word in re.findall(r"[a-z]+(?:-[a-z]+)?", (prompt or "").lower()):
        if word in MATERIAL_WORDS:
            found = word
            break
        if word.endswith("s") and word[:-1] in MATERIAL_WORDS:  # "metals", "stones"
            found = word[:-1]
            break
    m, r = MATERIAL_WORDS[found] if found else (DEFAULT_METALLIC, DEFAULT_ROUGHNESS)
    given_m = metallic is not None and metallic >= 0
    given_r = roughness is not None and roughness >= 0
    source = "request" if given_m and given_r else (found or "default")
    return MaterialFactors(float(metallic) if given_m else m, float(roughness) if given_r else r, source)
