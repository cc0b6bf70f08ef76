"""Per-scene settings, at ``Scene.gen3d``."""

import math

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

QUALITY_ITEMS = (
    ("draft", "Draft", "Fewest steps: a quick look"),
    ("standard", "Standard", "The usual balance of time and quality"),
    ("high", "High", "Most steps: slowest, best"),
)
TEXTURE_ITEMS = tuple((str(s), f"{s} px", f"Texture of {s} x {s} pixels") for s in (256, 512, 1024, 2048, 4096))
MATERIAL_ITEMS = (
    ("pbr", "PBR", "Base colour, a normal map from the detailed surface, metallic and roughness (from the prompt's "
                   "material words, e.g. 'steel' or 'wooden')"),
    ("albedo", "Albedo Only", "The base colour alone, on a plain rough dielectric"),
)
TOPOLOGY_ITEMS = (
    ("TRIS", "Triangles", "The mesh as the backend makes it"),
    ("QUADS", "Quads", "Quad-dominant at the face budget: the backend makes twice the budget in triangles and "
                       "says which pairs to join (never across a UV seam, so the texture stays as baked)"),
)
CAMERA_ITEMS = (
    ("NONE", "None", "Let the backend choose the views"),
    ("ALL", "All Cameras", "Send every perspective camera of the scene"),
    ("SELECTED", "Selected Cameras", "Send the selected perspective cameras"),
)


class GEN3D_SceneSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to generate, e.g. 'a red wooden chair'")
    negative_prompt: StringProperty(name="Negative Prompt", description="What to avoid (optional)")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1,
                      description="Same seed and settings give the same result")
    quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default="standard",
                          description="Sets the backend's step counts")
    faces: IntProperty(name="Face Budget", default=20000, min=500, max=1_000_000,
                       description="Number of faces of the generated mesh (triangles, or polygons, mostly quads, "
                                   "with Topology: Quads)")
    topology: EnumProperty(name="Topology", items=TOPOLOGY_ITEMS, default="TRIS",
                           description="Triangles, or a quad-dominant mesh for editing")
    texture_size: EnumProperty(name="Texture Size", items=TEXTURE_ITEMS, default="1024",
                               description="Size of the generated texture")
    material: EnumProperty(name="Material", items=MATERIAL_ITEMS, default="pbr",
                           description="What the generated material holds")
    height: FloatProperty(
        name="Height", default=1.0, min=0.0, soft_max=10.0, subtype="DISTANCE", unit="LENGTH",
        description=("Height of the generated object in the scene; it stands on the 3D cursor with its origin at "
                     "the bottom centre (0: keep the backend's size, a unit sphere around the cursor)"))
    text_method: EnumProperty(
        name="Method", default="IMAGE",
        items=(("IMAGE", "Front View", "Text to a front view, lifted to 3D by the novel-view model (fast)"),
               ("SDS", "Score Distillation", "The text prior shapes the whole object from random views "
                "(DreamFusion's method; slower, the back is the prior's and not one view's guess)")),
        description="How text becomes 3D")
    sds_anchor: BoolProperty(
        name="Anchor on a Front View", default=True,
        description="Score distillation also fits a front view made from the text (or the one chosen) and asks the "
                    "novel-view model about it, against objects with a second face on the back (slower)")
    choose_front: BoolProperty(
        name="Choose the Front View First", default=False,
        description="Generate makes several front views (seed variations) first; pick the one to lift to 3D")
    front_count: IntProperty(name="Candidates", default=4, min=2, max=8,
                             description="How many front views to choose from (seeds Seed, Seed + 1, ...)")
    refine: BoolProperty(name="Refine Texture", default=True,
                         description="Finish generated objects with texture refinement (slower, sharper)")
    image: PointerProperty(name="Reference Image", type=bpy.types.Image,
                           description="Image to turn into 3D (used when the active object is not an image empty)")
    elevation_auto: BoolProperty(
        name="Auto Elevation", default=True,
        description="Estimate how far above the object the reference was taken (from a few probe views of the "
                    "novel-view model); off: use the Elevation below")
    reference_elevation: FloatProperty(
        name="Reference Elevation", default=0.0, min=-math.radians(80), max=math.radians(80), subtype="ANGLE",
        description="How far above the object the reference picture was taken (0: level with it)")
    extra_params: StringProperty(
        name="Extra Parameters",
        description=('Advanced: backend job parameters as JSON, merged into every request; keyed by job kind '
                     '(text_to_3d, image_to_3d, refine_texture) or "*" for all, e.g. '
                     '{"*": {"seed": 7}, "text_to_3d": {"views": 8, "iterations": 300}}'),
        default="")
    # Refine texture
    refine_prompt: StringProperty(name="Prompt", description="The new look of the active mesh, e.g. 'rusty metal'")
    refine_image: PointerProperty(name="Reference Image", type=bpy.types.Image,
                                  description="Optional image of the look to aim for")
    refine_cameras: EnumProperty(name="Cameras", items=CAMERA_ITEMS, default="NONE",
                                 description="Scene cameras whose views the refinement should favour")


CLASSES = (GEN3D_SceneSettings,)


def register_properties() -> None:
    bpy.types.Scene.gen3d = PointerProperty(type=GEN3D_SceneSettings)


def unregister_properties() -> None:
    if hasattr(bpy.types.Scene, "gen3d"):
        del bpy.types.Scene.gen3d
