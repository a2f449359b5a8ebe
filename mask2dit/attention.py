"""Scene layout, mask policies and masked attention for Mask²DiT (METHOD.md sections 3-4).

One sample is the token sequence ``[T_1 .. T_n | V_1 .. V_n]``: all scene texts, then all
scene videos. A mask *policy* says, for text queries and for video queries, which of the
four key blocks (own text, other scenes' text, own video, other scenes' video) they see.

Tensor shape legend: B batch, H heads, L sequence length, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "POLICIES",
    "BlockRule",
    "KeySet",
    "SceneLayout",
    "build_attention_mask",
    "masked_attention",
    "resolve_policy",
]


@dataclass(frozen=True)
class SceneLayout:
    """Token layout of one sample: ``[T_1 .. T_n | V_1 .. V_n]``.

    ``text_lens[i]`` / ``video_lens[i]`` are the token counts of scene i's text and video;
    ``tokens_per_frame`` is the number of video tokens in one latent frame (h * w patches).
    """

    text_lens: tuple[int, ...]
    video_lens: tuple[int, ...]
    tokens_per_frame: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_lens", tuple(int(x) for x in self.text_lens))
        object.__setattr__(self, "video_lens", tuple(int(x) for x in self.video_lens))
        if len(self.text_lens) < 1:
            raise ValueError("SceneLayout needs at least one scene (text_lens is empty)")
        if len(self.text_lens) != len(self.video_lens):
            raise ValueError(
                f"SceneLayout needs one text and one video length per scene, got "
                f"{len(self.text_lens)} text_lens and {len(self.video_lens)} video_lens"
            )
        if min(self.text_lens) < 1 or min(self.video_lens) < 1:
            raise ValueError(
                f"every scene needs >= 1 text and >= 1 video token, got "
                f"text_lens={self.text_lens}, video_lens={self.video_lens}"
            )
        if self.tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        bad = [v for v in self.video_lens if v % self.tokens_per_frame]
        if bad:
            raise ValueError(
                f"video lengths {bad} are not divisible by tokens_per_frame="
                f"{self.tokens_per_frame} (a scene must hold whole latent frames)"
            )

    @classmethod
    def from_frames(
        cls, text_lens: Sequence[int], scene_frames: Sequence[int], tokens_per_frame: int
    ) -> SceneLayout:
        """Layout from per-scene latent frame counts instead of video token counts."""
        return cls(
            tuple(text_lens), tuple(f * tokens_per_frame for f in scene_frames), tokens_per_frame
        )

    @property
    def num_scenes(self) -> int:
        return len(self.text_lens)

    @property
    def text_len(self) -> int:
        """Total text tokens (all scenes)."""
        return sum(self.text_lens)

    @property
    def video_len(self) -> int:
        """Total video tokens (all scenes)."""
        return sum(self.video_lens)

    @property
    def seq_len(self) -> int:
        return self.text_len + self.video_len

    @property
    def scene_frames(self) -> tuple[int, ...]:
        """Latent frames per scene."""
        return tuple(v // self.tokens_per_frame for v in self.video_lens)

    def text_slice(self, i: int) -> slice:
        """Scene i's text tokens in the full sequence."""
        start = sum(self.text_lens[: self._check_scene(i)])
        return slice(start, start + self.text_lens[i])

    def video_slice(self, i: int) -> slice:
        """Scene i's video tokens in the full sequence."""
        start = self.text_len + sum(self.video_lens[: self._check_scene(i)])
        return slice(start, start + self.video_lens[i])

    def _check_scene(self, i: int) -> int:
        if not 0 <= i < self.num_scenes:
            raise IndexError(f"scene {i} out of range for {self.num_scenes} scenes")
        return i


@dataclass(frozen=True)
class KeySet:
    """Which key blocks a query of scene i may see: its own / other scenes' text and video."""

    own_text: bool
    other_text: bool
    own_video: bool
    other_video: bool

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in _BLOCK_NAMES if getattr(self, n))


_BLOCK_NAMES = ("own_text", "other_text", "own_video", "other_video")


@dataclass(frozen=True)
class BlockRule:
    """A mask policy: the key blocks text queries and video queries may attend to.

    Compact string form (for YAML/CLI ablations), kinds separated by ``;``, blocks by ``,``::

        "text:own_text,own_video;video:own_text,own_video,other_video"   # = v2

    Every query kind must see at least one block of its own scene, so that every query row
    has a key even when n = 1.
    """

    text_sees: KeySet
    video_sees: KeySet

    def __post_init__(self) -> None:
        for kind, ks in (("text", self.text_sees), ("video", self.video_sees)):
            if not (ks.own_text or ks.own_video):
                raise ValueError(
                    f"{kind} queries must see own_text or own_video (got {ks.names()}); "
                    f"otherwise a query has no key at n = 1"
                )

    @classmethod
    def parse(cls, spec: str) -> BlockRule:
        """Parse the compact form ``"text:a,b;video:c,d"`` (both kinds required)."""
        sees: dict[str, KeySet] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            kind, sep, blocks = part.partition(":")
            kind = kind.strip()
            if not sep or kind not in ("text", "video") or kind in sees:
                raise ValueError(
                    f"bad rule part {part!r} in {spec!r}: "
                    "expected 'text:...' and 'video:...' once each"
                )
            names = {b.strip() for b in blocks.split(",") if b.strip()}
            unknown = names - set(_BLOCK_NAMES)
            if unknown:
                raise ValueError(
                    f"unknown key blocks {sorted(unknown)} in {spec!r}; valid: {_BLOCK_NAMES}"
                )
            sees[kind] = KeySet(*(n in names for n in _BLOCK_NAMES))
        if set(sees) != {"text", "video"}:
            raise ValueError(f"rule {spec!r} must give both 'text:' and 'video:' parts")
        return cls(text_sees=sees["text"], video_sees=sees["video"])

    def to_string(self) -> str:
        return f"text:{','.join(self.text_sees.names())};video:{','.join(self.video_sees.names())}"


POLICIES: dict[str, BlockRule] = {
    # The paper's choice: text binds to its scene, video sees all video.
    "v2": BlockRule(KeySet(True, False, True, False), KeySet(True, False, True, True)),
    # The paper's v5: no mask.
    "full": BlockRule(KeySet(True, True, True, True), KeySet(True, True, True, True)),
    # n independent generations.
    "isolated": BlockRule(KeySet(True, False, True, False), KeySet(True, False, True, False)),
}


def resolve_policy(policy: str | BlockRule) -> BlockRule:
    """A named policy (``v2``, ``full``, ``isolated``), a compact rule string, or a rule."""
    if isinstance(policy, BlockRule):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str or BlockRule, got {type(policy).__name__}")
    if policy in POLICIES:
        return POLICIES[policy]
    if ":" in policy:
        return BlockRule.parse(policy)
    raise ValueError(
        f"unknown mask policy {policy!r}; valid names: {sorted(POLICIES)} "
        f"(or a rule such as 'text:own_text,own_video;video:own_text,own_video,other_video')"
    )


def build_attention_mask(layout: SceneLayout, policy: str | BlockRule = "v2") -> torch.Tensor:
    """Dense (L, L) bool mask, True where query row may attend key column.

    Reference only (tests, small L): at production L it is billions of entries.
    """
    rule = resolve_policy(policy)
    n, L = layout.num_scenes, layout.seq_len
    scene = torch.empty(L, dtype=torch.long)
    is_text = torch.zeros(L, dtype=torch.bool)
    for i in range(n):
        scene[layout.text_slice(i)] = i
        scene[layout.video_slice(i)] = i
        is_text[layout.text_slice(i)] = True
    same = scene[:, None] == scene[None, :]
    key_text = is_text[None, :]
    mask = torch.zeros(L, L, dtype=torch.bool)
    for q_is_text, ks in ((True, rule.text_sees), (False, rule.video_sees)):
        allowed = (
            (same & key_text & ks.own_text)
            | (~same & key_text & ks.other_text)
            | (same & ~key_text & ks.own_video)
            | (~same & ~key_text & ks.other_video)
        )
        rows = is_text if q_is_text else ~is_text
        mask[rows] = allowed[rows]
    return mask


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SceneLayout,
    policy: str | BlockRule = "v2",
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q/k/v (B, H, L, D) in layout order under a mask policy.

    TEMPORARY correct-but-dense version; the grouped exact version replaces it.
    """
    mask = build_attention_mask(layout, policy).to(q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
