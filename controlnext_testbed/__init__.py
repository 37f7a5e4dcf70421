"""What the tests, the benchmarks and the demo share: ComfyUI used as a library (comfy_library), small
models built with ComfyUI's own classes (tiny_unet: random UNets of the real layouts;
tiny_preprocessors: stand-in pose and depth networks), random files in the official layouts
(official_layouts) and the toy shapes world (toy_shapes, toy_world). Importing this package imports
nothing of ComfyUI; the modules that need it say so."""
