"""The Gradio page of `vd ui`: sections Clip, Objects, Invert, Edit, Export over vdcli.ui.actions.Studio, and
the named API endpoints /open, /track, /invert, /edit, /export (gradio_client can script the page).

Gradio is imported here, and this module only inside the `vd ui` command (the extra `vd[ui]`). Errors reach the page as
the stage's one-line message (a Gradio toast), never a traceback.
"""

from __future__ import annotations

import functools
import os
import traceback
from typing import Any, Callable

import gradio as gr

from stages.common.errors import VdError, first_line
from vdcli.ui import objects as obj
from vdcli.ui.actions import Studio
from vdcli.ui.paths import VIDEO_SUFFIXES

STATUS_SECONDS = 2.0  # how often every tab refreshes the job line
IMAGE_PX = 400  # shown height of frames, previews and players
# the mask preview GIF fills its box (Gradio shows an image at most at its own size); the clickable frame is
# enlarged on the server instead (vdcli.ui.objects.zoom), so that a click maps back to an exact frame pixel
CSS = "#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def one_line(exc: BaseException) -> str:
    """The page's message for an exception: the stage's own line, else one line naming the type."""
    if isinstance(exc, VdError):
        return first_line(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "stopped; finished work is kept in the workspace, run it again to resume"
    from stages.models.oom import is_oom, out_of_memory

    if is_oom(exc):
        return first_line(out_of_memory(exc))
    return f"unexpected {type(exc).__name__}: {first_line(str(exc))} (set VD_DEBUG=1 for a traceback)"


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure of a page action into gr.Error with one line (the signature is kept for Gradio)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt from Stop included
            if isinstance(exc, (SystemExit, GeneratorExit)):
                raise
            if os.environ.get("VD_DEBUG"):
                traceback.print_exc()
            raise gr.Error(one_line(exc), print_exception=False) from None

    return wrapper


def reporter(progress: Any) -> Callable[[float, float | None, str], None]:
    """Gradio's progress bar as a vdcli.ui.jobs.Report."""

    def report(done: float, total: float | None, description: str) -> None:
        try:
            progress((int(done), int(total)) if total else None, desc=description)
        except Exception:  # the bar is best effort (an API call without a page has none)
            pass

    return report


def command_box(elem_id: str) -> Any:
    """A one-line, copyable box for an action's equivalent `vd` command."""
    return gr.Textbox(label="Equivalent command", interactive=False, lines=1, max_lines=4, buttons=["copy"],
                      elem_id=elem_id)


def build(studio: Studio, max_upload: int) -> Any:
    """The page (a gr.Blocks, not launched)."""
    clips, spaces = studio.root.clips(), studio.root.workspaces()
    sam2_ok, sam2_line = studio.sam2_state()
    defaults = studio.invert_defaults()

    with gr.Blocks(title="vd", analytics_enabled=False) as page:
        gr.Markdown(f"# vd\nRoot: `{studio.root.path}` (the page reads and writes only inside it). Every action "
                    f"shows the equivalent `vd` command.")
        with gr.Row():
            status = gr.Textbox(label="Job", value=studio.status(), interactive=False, scale=6, elem_id="job")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        workspace = gr.Textbox(label="Workspace", interactive=False, elem_id="workspace")
        info = gr.Textbox(label="Workspace state (vd info)", lines=4, max_lines=14, interactive=False,
                          elem_id="info")

        gr.Markdown("## Clip")
        with gr.Row():
            clip = gr.Dropdown(clips, value=clips[0] if clips else None, label="Clip under the root",
                               allow_custom_value=True, elem_id="clip")
            upload = gr.File(label=f"Or upload a clip (at most {max_upload / 2**20:.0f} MiB)",
                             file_types=list(VIDEO_SUFFIXES), type="filepath", elem_id="upload")
            picked = gr.Dropdown(spaces, value=None, label="Or an existing workspace", allow_custom_value=True,
                                 elem_id="pick-workspace")
        with gr.Row():
            start = gr.Number(0, label="Start frame", precision=0, minimum=0)
            frames = gr.Textbox("16", label="Frames (a number or all)", elem_id="frames")
            stride = gr.Number(1, label="Stride", precision=0, minimum=1)
            size = gr.Textbox("512", label="Size (N or WIDTHxHEIGHT, multiples of 64)", elem_id="size")
            resize = gr.Radio(["crop", "pad", "stretch"], value="crop", label="Resize")
            ws_name = gr.Textbox(label="Workspace (default: CLIP.vd in the root)")
        with gr.Row():
            open_clip = gr.Button("Open clip", variant="primary", elem_id="open-clip")
            open_ws = gr.Button("Open workspace", elem_id="open-workspace")
        clip_cmd = command_box("clip-cmd")

        gr.Markdown("## Objects")
        with gr.Row():
            with gr.Column():
                frame = gr.Image(label="Frame: click to add a point", type="numpy", format="png", interactive=False,
                                 height=IMAGE_PX, elem_id="frame")
                scrub = gr.Slider(0, 1, value=0, step=1, label="Frame shown (the prompt frame: points and boxes "
                                                                "refer to it)", elem_id="scrub")
            with gr.Column():
                preview = gr.Image(label="Mask preview (masks/preview.gif)", type="filepath", interactive=False,
                                   height=IMAGE_PX, elem_id="preview")
        with gr.Row():
            current = gr.Dropdown([obj.DEFAULT], value=obj.DEFAULT, label="Object", elem_id="current")
            mode = gr.Radio([*obj.LABELS, obj.BOX_MODE], value="object point", label="A click adds",
                            elem_id="mode")
            undo = gr.Button("Remove last point")
            clear = gr.Button("Clear object")
        with gr.Row():
            new_name = gr.Textbox(label="New object name")
            new_phrase = gr.Textbox(label="Its words in the prompt (phrase)")
            add = gr.Button("Add object")
            remove = gr.Button("Remove object")
        with gr.Row():
            box = gr.Textbox(label="Box X0,Y0,X1,Y1 (frame pixels; empty clears)", elem_id="box")
            set_box = gr.Button("Set box", elem_id="set-box")
            text = gr.Textbox(label="Find by phrase (Grounding DINO; empty clears)")
            set_text = gr.Button("Set phrase search")
        objects_json = gr.Code(obj.dump_objects([obj.blank()]), label="Objects (JSON; editable)", language="json",
                               interactive=True, lines=3, elem_id="objects")
        corner = gr.State(None)
        note = gr.Markdown(elem_id="click-note")
        gr.Markdown(("" if sam2_ok else "**") + sam2_line + ("" if sam2_ok else "**"), elem_id="sam2")
        with gr.Row():
            box_only = gr.Checkbox(not sam2_ok, label="Box only (no SAM2: one object, its box on every frame)",
                                   elem_id="box-only")
            ellipse = gr.Checkbox(True, label="Ellipse (the edit mask adds the mask's ellipse)")
            track = gr.Button("Track", variant="primary", elem_id="track")
        track_note = gr.Markdown()
        track_cmd = command_box("track-cmd")

        gr.Markdown("## Invert")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt: describes the SOURCE video", elem_id="invert-prompt")
            subject = gr.Textbox(label="Subject: its words in the prompt (optional)")
        with gr.Row():
            method = gr.Dropdown(["null-text", "direct", "negative-prompt"], value=defaults["method"],
                                 label="Method")
            steps = gr.Number(defaults["steps"], label="Steps", precision=0, minimum=2, elem_id="steps")
            null_steps = gr.Number(defaults["null_steps"], label="Null-text steps", precision=0, minimum=0,
                                   elem_id="null-steps")
            checkpointing = gr.Radio(["auto", "off", "blocks", "layers"], value="auto", label="Checkpointing")
        with gr.Row():
            estimate = gr.Button("Estimate")
            invert = gr.Button("Invert", variant="primary", elem_id="invert")
        estimate_text = gr.Textbox(label="Estimate (vd invert --dry-run)", lines=4, max_lines=14,
                                   interactive=False, elem_id="estimate")
        with gr.Row():
            summary = gr.Textbox(label="Result", lines=3, interactive=False, elem_id="invert-result")
            recon = gr.Video(label="Reconstruction", interactive=False, height=IMAGE_PX, elem_id="recon")
        invert_cmd = command_box("invert-cmd")

        gr.Markdown("## Edit")
        with gr.Row():
            edit_prompt = gr.Textbox(label="Target prompt, or a phrase that replaces the subject",
                                     elem_id="edit-prompt")
            edit_name = gr.Textbox(label="Edit name (default: the changed words)")
        targets = gr.Dataframe([["", "", ""]], headers=["object", "source phrase", "target phrase"],
                               label="Or one target per object (fill target phrases)", interactive=True,
                               type="array", elem_id="targets")
        with gr.Row():
            first_frame = gr.Image(label="Edited first frame (optional; SparseCtrl RGB)", type="filepath",
                                   sources=["upload"])
            with gr.Column():
                ff_scale = gr.Number(1.0, label="First-frame scale")
                tau_s = gr.Slider(0, 1, value=0.4, step=0.05, label="tau_s: fraction of steps with SA-I")
                tau_c = gr.Slider(0, 1, value=0.8, step=0.05, label="tau_c: fraction with Prompt-to-Prompt")
                blend = gr.Textbox(label="Local blend words (optional)")
                force = gr.Checkbox(False, label="Replace an edit of the same name")
        run_edit = gr.Button("Edit", variant="primary", elem_id="edit")
        with gr.Row():
            player = gr.Video(label="Source | edit", interactive=False, height=IMAGE_PX, elem_id="player")
            scores = gr.Dataframe(headers=["metric", "value"], label="Scores (vd eval)", interactive=False,
                                  elem_id="scores")
        edit_cmd = command_box("edit-cmd")
        edited = gr.State(None)

        gr.Markdown("## Export")
        with gr.Row():
            export_edit = gr.Dropdown([], label="Edit", allow_custom_value=True, elem_id="export-edit")
            codec = gr.Dropdown(["h264", "h265", "prores", "ffv1", "png"], value="h264", label="Codec")
            crf = gr.Number(None, label="CRF (h264/h265; empty: default)", precision=0)
            audio = gr.Radio(["copy", "none"], value="copy", label="Audio")
            feather = gr.Number(None, label="Feather px (empty: automatic)", precision=0)
        with gr.Row():
            whole = gr.Checkbox(False, label="Whole clip")
            colour = gr.Checkbox(True, label="Colour match")
            ex_force = gr.Checkbox(False, label="Replace an existing export")
            run_export = gr.Button("Export", variant="primary", elem_id="export")
        export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
        export_note = gr.Markdown()
        export_cmd = command_box("export-cmd")

        # ------------------------------------------------------------------ handlers
        opened = [workspace, info, frame, scrub, preview, objects_json, current, corner, clip_cmd, prompt, subject,
                  method, steps, null_steps, targets, export_edit]

        def show_opened(result: dict[str, Any]) -> dict[Any, Any]:
            objects = result["objects"]
            inv = result["defaults"]["inversion"]
            rows = [[n, p, ""] for n, p in result["defaults"]["objects"]] or [["", "", ""]]
            edits = result["defaults"]["edits"]
            return {workspace: result["workspace"], info: result["info"],
                    frame: redraw(result["workspace"], objects, 0),
                    scrub: gr.update(maximum=max(result["frames"] - 1, 1), value=0),
                    preview: result["preview"], objects_json: obj.dump_objects(objects),
                    current: gr.update(choices=[o["name"] for o in objects], value=objects[0]["name"]),
                    corner: None, clip_cmd: result["command"], prompt: inv.get("prompt") or "",
                    subject: inv.get("subject") or "", method: inv.get("method") or defaults["method"],
                    steps: inv.get("steps") or defaults["steps"],
                    null_steps: inv.get("null_steps") if inv.get("null_steps") is not None
                    else defaults["null_steps"],
                    targets: rows, export_edit: gr.update(choices=edits, value=edits[-1] if edits else None)}

        @guarded
        def on_open_clip(clip_: str, frames_: str, size_: str, start_: float, stride_: float, resize_: str,
                         name_: str) -> dict[Any, Any]:
            return show_opened(studio.open_clip(clip_, frames_, size_, int(start_ or 0),
                                                int(stride_) if stride_ else None, resize_, name_ or None))

        @guarded
        def on_open_ws(picked_: str) -> dict[Any, Any]:
            return show_opened(studio.open_workspace(picked_))

        @guarded
        def on_upload(path: str | None) -> Any:
            if not path:
                return gr.update()
            saved = studio.save_upload(path, max_upload)
            return gr.update(choices=studio.root.clips(), value=saved)

        def redraw(ws: str, objects: list[dict[str, Any]], index: float, corner_: Any = None) -> Any:
            if not ws:
                return None
            shown = studio.frame(ws, int(index or 0), objects, corner_)
            return obj.enlarge(shown, obj.zoom(*shown.shape[:2]))

        @guarded
        def on_click(ws: str, objects_text: str, name: str, mode_: str, corner_: Any, index: float,
                     evt: gr.SelectData) -> tuple[Any, ...]:
            if not ws:
                raise VdError("open a clip or a workspace first")
            objects = obj.parse_objects(objects_text)
            height, width = studio.frames(ws).shape[1:3]
            factor = obj.zoom(height, width)  # the frame is shown enlarged by this whole factor
            x, y = min(int(evt.index[0]) // factor, width - 1), min(int(evt.index[1]) // factor, height - 1)
            objects, corner_, said = obj.click(objects, name, x, y, mode_, corner_)
            return obj.dump_objects(objects), redraw(ws, objects, index, corner_), corner_, said

        def edit_objects(change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                         select: Callable[[list[dict[str, Any]]], str | None] | None = None) -> Callable[..., Any]:
            @guarded
            def handler(ws: str, objects_text: str, index: float, *args: Any) -> tuple[Any, ...]:
                objects = change(obj.parse_objects(objects_text), *args)
                names = [o["name"] for o in objects]
                chosen = select(objects, *args) if select else None
                return (obj.dump_objects(objects), redraw(ws, objects, index),
                        gr.update(choices=names, value=chosen) if chosen or not names else gr.update(choices=names))
            return handler

        outs = [objects_json, frame, current]
        base = [workspace, objects_json, scrub]
        add.click(edit_objects(lambda o, n, p: obj.add_object(o, n, p), lambda o, n, p: o[-1]["name"]),
                  [*base, new_name, new_phrase], outs, queue=False, api_visibility="private")
        remove.click(edit_objects(lambda o, n: obj.remove_object(o, n),
                                  lambda o, n: o[0]["name"] if o else None),
                     [*base, current], outs, queue=False, api_visibility="private")
        undo.click(edit_objects(lambda o, n: obj.undo_point(o, n)), [*base, current], outs, queue=False,
                   api_visibility="private")
        clear.click(edit_objects(lambda o, n: obj.clear(o, n)), [*base, current], outs, queue=False,
                    api_visibility="private")
        set_box.click(edit_objects(lambda o, n, b: obj.set_field(o, n, "box", b)), [*base, current, box], outs,
                      queue=False, api_visibility="private")
        set_text.click(edit_objects(lambda o, n, t: obj.set_field(o, n, "text", t)), [*base, current, text], outs,
                       queue=False, api_visibility="private")
        objects_json.blur(edit_objects(lambda o: o), base, outs, queue=False, api_visibility="private")
        frame.select(on_click, [workspace, objects_json, current, mode, corner, scrub],
                     [objects_json, frame, corner, note], queue=False, api_visibility="private")
        scrub.change(guarded(lambda ws, o, i, c: redraw(ws, obj.parse_objects(o), i, c)),
                      [workspace, objects_json, scrub, corner], frame, queue=False, api_visibility="private")
        open_clip.click(on_open_clip, [clip, frames, size, start, stride, resize, ws_name], opened,
                        api_visibility="private")
        open_ws.click(on_open_ws, [picked], opened, api_visibility="private")
        upload.upload(on_upload, [upload], [clip], api_visibility="private")

        @guarded
        def on_track(ws: str, objects_text: str, box_only_: bool, index: float, ellipse_: bool,
                     progress: Any = gr.Progress()) -> tuple[Any, ...]:
            result = studio.track(ws, objects_text, box_only_, int(index or 0), ellipse_, reporter(progress))
            rows = [[n, p, ""] for n, p in studio.defaults(ws)["objects"]] or [["", "", ""]]
            return result["preview"], result["note"], result["command"], result["info"], rows

        track.click(on_track, [workspace, objects_json, box_only, scrub, ellipse],
                    [preview, track_note, track_cmd, info, targets], api_visibility="private")

        invert_inputs = [workspace, prompt, subject, method, steps, null_steps, checkpointing]

        @guarded
        def on_estimate(ws: str, *fields: Any) -> tuple[str, str]:
            result = studio.estimate(ws, *fields)
            return result["text"], result["command"]

        @guarded
        def on_invert(ws: str, prompt_: str, subject_: str, method_: str, steps_: float, null_: float,
                      ck: str, progress: Any = gr.Progress()) -> tuple[Any, ...]:
            result = studio.invert(ws, prompt_, subject_, method_, steps_, null_, ck, reporter(progress))
            return result["summary"], result["video"], result["command"], result["info"]

        estimate.click(on_estimate, invert_inputs, [estimate_text, invert_cmd], api_visibility="private")
        invert.click(on_estimate, invert_inputs, [estimate_text, invert_cmd], api_visibility="private").success(
            on_invert, invert_inputs, [summary, recon, invert_cmd, info], api_visibility="private")

        @guarded
        def on_edit(ws: str, prompt_: str, name_: str, rows: Any, ff: str | None, ff_scale_: float, tau_s_: float,
                    tau_c_: float, blend_: str, force_: bool, progress: Any = gr.Progress()) -> tuple[Any, ...]:
            regions = {str(r[0]).strip(): str(r[2]) for r in (rows or []) if len(r) > 2 and r[0] and str(r[2]).strip()}
            result = studio.edit(ws, prompt_, name_, regions, ff, ff_scale_, tau_s_, tau_c_, blend_, force_,
                                 reporter(progress))
            edits = studio.defaults(ws)["edits"]
            return (result["side_by_side"], result["command"], result["info"],
                    gr.update(choices=edits, value=result["name"]), result["name"])

        @guarded
        def on_scores(ws: str, name: str | None, progress: Any = gr.Progress()) -> Any:
            if not name:
                return gr.update()
            return studio.evaluate(ws, name, reporter(progress))["rows"]

        run_edit.click(on_edit, [workspace, edit_prompt, edit_name, targets, first_frame, ff_scale, tau_s, tau_c,
                                 blend, force], [player, edit_cmd, info, export_edit, edited],
                       api_visibility="private").success(on_scores, [workspace, edited], [scores],
                                                         api_visibility="private")

        @guarded
        def on_export(ws: str, name: str, codec_: str, crf_: float | None, audio_: str, whole_: bool,
                      feather_: float | None, colour_: bool, force_: bool,
                      progress: Any = gr.Progress()) -> tuple[Any, ...]:
            result = studio.export(ws, name, codec_, crf_, audio_, whole_, feather_, colour_, force_,
                                   reporter(progress))
            folder = os.path.isdir(result["path"])
            said = f"written: `{result['path']}`" + (" (a folder of PNGs: no download)" if folder else "")
            return (None if folder else result["path"]), said, result["command"]

        run_export.click(on_export, [workspace, export_edit, codec, crf, audio, whole, feather, colour, ex_force],
                         [export_file, export_note, export_cmd], api_visibility="private")

        stop.click(studio.stop, None, status, queue=False, api_visibility="private")
        gr.Timer(STATUS_SECONDS).tick(studio.status, None, status, queue=False, show_progress="hidden",
                                      api_visibility="private")
        page.load(lambda: (gr.update(choices=studio.root.clips()), gr.update(choices=studio.root.workspaces()),
                           studio.status()), None, [clip, picked, status], queue=False, api_visibility="private")

        add_api(studio)
    return page


def add_api(studio: Studio) -> None:
    """The named endpoints (gradio_client: Client(url).predict(..., api_name="/track")); same actions."""

    @guarded
    def open(clip: str, frames: str = "16", size: str = "512", start: int = 0) -> str:  # noqa: A001
        """Open a clip under the root (frames selected as vd mask does); returns the workspace path that
        /track writes."""
        return studio.open_clip(clip, str(frames), str(size), int(start or 0))["workspace"]

    @guarded
    def track(workspace: str, objects: str, box_only: bool = False) -> gr.FileData:
        """Run vd mask for the objects (JSON list of {name, phrase, points [[x, y, label]], box [x0, y0, x1,
        y1], text}); returns masks/preview.gif."""
        return gr.FileData(path=studio.track(workspace, objects, bool(box_only))["preview"])

    @guarded
    def invert(workspace: str, prompt: str, subject: str = "", method: str = "", steps: int = 0,
               null_steps: int = -1) -> str:
        """Run (or resume) vd invert; empty/0/-1 values keep the stored or default settings; returns the
        summary."""
        return studio.invert(workspace, prompt, subject or None, method or None, steps or None,
                             null_steps if null_steps is not None and null_steps >= 0 else None)["summary"]

    @guarded
    def edit(workspace: str, prompt: str, name: str = "") -> gr.FileData:
        """Run vd edit with a target prompt; returns the edit's mp4."""
        return gr.FileData(path=studio.edit(workspace, prompt, name or None)["video"])

    @guarded
    def export(workspace: str, name: str = "") -> gr.FileData:
        """Run vd export (h264, audio copied) for the edit; returns the exported file."""
        return gr.FileData(path=studio.export(workspace, name or None)["path"])

    for fn in (open, track, invert, edit, export):
        gr.api(fn, api_name=fn.__name__)
