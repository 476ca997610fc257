"""MedSAM3D: box-prompted 3D segmentation and volumetry in 3D Slicer, with medsam3d.

Place a ROI box around each object, press Segment: each object comes back as a named,
coloured segment with its surface in the 3D view, and a table gives its volume (mL), the
range of the engine's alternatives, its axial long and short axes and its largest 3D diameter.
"Refine on current slice" adds the current ROI's box on the slice shown in the Red view.

The work happens in medsam3d, either in Slicer's Python (in-process; installed on first use
after the user agrees, from a wheel or a source folder) or in a ``medsam3d serve`` server
(this module then needs nothing beyond Python's standard library). The conversion between
Slicer nodes and medsam3d's data lives in ``MedSAM3DLib/bridge.py``.
"""

import logging
import os
import tempfile
import unittest
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedSAM3DLib import bridge
from MedSAM3DLib.backends import MODALITIES, Cancelled, InProcessBackend, Progress, ServerBackend

MODES = ["In-process", "Server"]
MODELS = ["litemedsam", "medsam", "sam-vit-b", "sam-vit-l", "sam-vit-h"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
#: per-machine settings (QSettings), not saved in scenes: paths and the server URL; the token is never stored
SETTINGS = "MedSAM3D/"


#
# MedSAM3D
#
class MedSAM3D(ScriptedLoadableModule):
    """The module's metadata (shown in Slicer's module list and help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["medsam3d developers"]
        self.parent.helpText = (
            "Box-prompted 3D segmentation and volumetry with medsam3d (LiteMedSAM, SAM, MedSAM). "
            "Place a ROI box around each object (its name is the object's name), press Segment. "
            "Runs in Slicer's Python (medsam3d installed on first use, after you agree) or against a "
            "<code>medsam3d serve</code> server. See the medsam3d user guide, page 'Using 3D Slicer'."
        )
        self.parent.acknowledgementText = (
            "LiteMedSAM and MedSAM: bowang-lab/MedSAM (Apache-2.0). Segment Anything: Meta AI (Apache-2.0)."
        )


#
# MedSAM3DParameterNode
#
@parameterNodeWrapper
class MedSAM3DParameterNode:
    """The module's state saved with the scene (paths, the server URL and the token are not:
    they belong to the machine and the user, see ``SETTINGS``).

    inputVolume: the volume to segment.
    outputSegmentation: where the objects go (created when none is chosen).
    outputTable: the measurements (created when none is chosen).
    mode: "In-process" (medsam3d in Slicer's Python) or "Server" (``medsam3d serve``).
    model, device: the in-process model and where it runs (a server has its own).
    fast: medsam3d's speed preset (fewer decodes, slightly lower Dice).
    showSurface: show the objects' surfaces in the 3D view.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    mode: Annotated[str, Choice(MODES)] = "In-process"
    model: Annotated[str, Choice(MODELS)] = "litemedsam"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    fast: bool = False
    showSurface: bool = True


#
# MedSAM3DWidget
#
class MedSAM3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: nothing is computed here, everything goes through :class:`MedSAM3DLogic`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAM3DLogic()

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS + "serverUrl", "http://127.0.0.1:8000")
        self.ui.checkpointPathLineEdit.currentPath = settings.value(SETTINGS + "checkpoint", "")
        self.ui.medsam3dSourcePathLineEdit.currentPath = settings.value(SETTINGS + "medsam3dSource", "")
        self.ui.serverTokenLineEdit.text = os.environ.get("MEDSAM3D_TOKEN", "")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.addRoiButton.connect("clicked(bool)", self.onAddRoiButton)
        self.ui.checkServerButton.connect("clicked(bool)", self.onCheckServerButton)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onCurrentRoiChanged)
        self.ui.roiSelector.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.objectNameLineEdit.connect("editingFinished()", self.onObjectNameEdited)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.updateModeWidgets)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()

        self.initializeParameterNode()
        self.updateModeWidgets()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.close()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        """Detach a running task (its result would land in the closed scene's nodes): cancel it,
        forget it, stop polling; the logic closes the server session on its worker thread, after
        the cancelled run, so no HTTP request blocks the GUI here."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = ""
        self.logic.close()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # the .ui's widgets carry a "SlicerParameterName" property naming their field
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    # ------------------------------------------------------------------ GUI state
    def updateModeWidgets(self, *args) -> None:
        server = self.ui.modeComboBox.currentText == "Server"
        self.ui.inProcessGroupBox.visible = not server
        self.ui.serverGroupBox.visible = server

    def updateButtons(self, *args) -> None:
        if not hasattr(self, "ui"):
            return
        running = self._task is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self.ui.roiSelector.checkedNodes())
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = ("Segment the checked ROIs' objects" if ready
                                       else "Choose a volume and check at least one ROI")
        self.ui.refineButton.enabled = (not running and self.logic is not None and self.logic.canRefine()
                                        and self.ui.roiSelector.currentNode() is not None)
        self.ui.cancelButton.enabled = running

    def onCurrentRoiChanged(self, node) -> None:
        self.ui.objectNameLineEdit.text = node.GetName() if node else ""
        self.ui.objectNameLineEdit.enabled = node is not None
        self.updateButtons()

    def onObjectNameEdited(self) -> None:
        node = self.ui.roiSelector.currentNode()
        name = self.ui.objectNameLineEdit.text.strip()
        if node is not None and name:
            node.SetName(name)  # the ROI's name is the object's name

    def onAddRoiButton(self) -> None:
        count = len(slicer.util.getNodesByClass("vtkMRMLMarkupsROINode"))
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"object {count + 1}")
        roi.CreateDefaultDisplayNodes()
        self.ui.roiSelector.setCurrentNode(roi)
        self.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)
        selection = slicer.mrmlScene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsROINode")
        selection.SetActivePlaceNodeID(roi.GetID())
        slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton").SetCurrentInteractionMode(
            slicer.vtkMRMLInteractionNode.Place)

    def _settings(self) -> dict:
        settings = qt.QSettings()
        values = {
            "serverUrl": self.ui.serverUrlLineEdit.text.strip(),
            "checkpoint": self.ui.checkpointPathLineEdit.currentPath.strip(),
            "medsam3dSource": self.ui.medsam3dSourcePathLineEdit.currentPath.strip(),
        }
        for key, value in values.items():
            settings.setValue(SETTINGS + key, value)
        values["token"] = self.ui.serverTokenLineEdit.text.strip() or None
        values["allowInsecureHttp"] = bool(self.ui.allowInsecureHttpCheckBox.checked)  # not saved: opt in each time
        return values

    def onCheckServerButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not reach the medsam3d server.", waitCursor=True):
            s = self._settings()
            backend = ServerBackend(s["serverUrl"], s["token"], allow_insecure_http=s["allowInsecureHttp"])
            health = backend.health()
            model = health.get("model") or {}
            self.ui.statusLabel.text = (f"Server: medsam3d {health.get('medsam3d_version')}, model {model.get('name')} "
                                        f"on {model.get('device')}, {health.get('sessions')}/{health.get('max_sessions')}"
                                        " sessions")

    # ------------------------------------------------------------------ runs
    def _prepare(self) -> bool:
        """Configure the logic's backend; in-process, install medsam3d first if the user agrees."""
        p = self._parameterNode
        s = self._settings()
        if p.mode == "Server":
            self.logic.useServer(s["serverUrl"], s["token"], allowInsecureHttp=s["allowInsecureHttp"])
            return True
        from MedSAM3DLib import install

        if not install.ensure_medsam3d(s["medsam3dSource"] or None):
            return False  # the user declined the installation
        self.logic.useInProcess(p.model, p.device, s["checkpoint"] or None)
        return True

    def _outputs(self):
        p = self._parameterNode
        if not p.outputSegmentation:
            p.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                      f"{p.inputVolume.GetName()} MedSAM3D")
        if not p.outputTable:
            p.outputTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                               f"{p.inputVolume.GetName()} MedSAM3D measurements")
        return p.outputSegmentation, p.outputTable

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("MedSAM3D could not start.", waitCursor=True):
            if not self._prepare():
                return
            p = self._parameterNode
            rois = list(self.ui.roiSelector.checkedNodes())
            segmentation, table = self._outputs()
            # the task keeps the nodes chosen now: the result goes there, whatever is selected when it arrives
            task = self.logic.startSegment(p.inputVolume, rois, options={"fast": p.fast or None},
                                           segmentationNode=segmentation, tableNode=table)
            self._watch(task)

    def onRefineButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("MedSAM3D could not refine.", waitCursor=True):
            roi = self.ui.roiSelector.currentNode()
            sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            segmentation, table = self._outputs()
            task = self.logic.startRefine(self._parameterNode.inputVolume, roi, sliceNode, objectName=roi.GetName(),
                                          segmentationNode=segmentation, tableNode=table)
            self._watch(task)

    def onCancelButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def _watch(self, task) -> None:
        self._task = task
        self.ui.progressBar.show()
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = "Starting..."
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(200)
            self._timer.connect("timeout()", self._poll)
        self._timer.start()
        self.updateButtons()

    def _poll(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        done, total, message = task.progress.snapshot()
        if total > 0:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.value = done
        self.ui.statusLabel.text = message or "Working..."
        if not task.done():
            return
        self._timer.stop()
        self._task = None
        self.ui.progressBar.hide()
        try:
            outcome = task.result()
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled."
        except Exception as exc:  # shown, not swallowed: the message is medsam3d's or the server's one line
            logging.exception("MedSAM3D run failed")
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"MedSAM3D failed: {exc}")
        else:
            with slicer.util.tryWithErrorDisplay("Could not show the result.", waitCursor=True):
                # the volume and outputs the run was started with, not the ones selected now
                segmentation, table = task.segmentationNode, task.tableNode
                if not self.logic.inScene(segmentation) or not self.logic.inScene(table):
                    segmentation, table = self._outputs()
                p = self._parameterNode
                showSurface = p.showSurface if p else True
                self.logic.applyOutcome(outcome, task.volumeNode, segmentation, table, showSurface=showSurface)
                self.ui.resultsTableView.setMRMLTableNode(table)
                objects = outcome.record.get("objects", [])
                self.ui.statusLabel.text = "Done: " + ", ".join(
                    f"{o['name']} {o['volume_ml']:.2f} mL" for o in objects)
        self.updateButtons()


#
# MedSAM3DLogic
#
class Task:
    """A run on the logic's worker thread: ``progress`` (thread-safe), ``cancel()``, ``done()``,
    ``result()`` (the :class:`~MedSAM3DLib.backends.Outcome`, or the run's exception).

    ``volumeNode`` is the volume the run segments and ``segmentationNode``/``tableNode`` the
    outputs chosen when it started (None when the caller chose none): the result is applied to
    these, even if the selection changed while the run went on."""

    def __init__(self, future, progress: Progress, volumeNode=None, segmentationNode=None, tableNode=None):
        self.future, self.progress = future, progress
        self.volumeNode, self.segmentationNode, self.tableNode = volumeNode, segmentationNode, tableNode

    def cancel(self) -> None:
        self.progress.cancel()

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout=None):
        return self.future.result(timeout)


class MedSAM3DLogic(ScriptedLoadableModuleLogic):
    """Orchestration only: nodes -> medsam3d's inputs (:mod:`bridge`), a backend runs them on one
    worker thread (medsam3d in-process or a server), the outcome -> nodes (:mod:`bridge`).

    Usable without the GUI (``process``), for scripts and the self-test. The scene is touched
    only on the calling (main) thread; the worker thread sees arrays, files and JSON.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.backend = None
        self._backendConfig = None
        self._executor = None
        self._tempDir = None
        self._lastVolumeKey = None

    def getParameterNode(self):
        return MedSAM3DParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ backends
    def useInProcess(self, model: str = "litemedsam", device: str = "auto", checkpoint=None) -> None:
        self._useBackend(("in-process", model, device, checkpoint), lambda: InProcessBackend(model, device, checkpoint))

    def useServer(self, url: str, token=None, allowInsecureHttp: bool = False) -> None:
        """A ``medsam3d serve`` server; with a token, ``http://`` to another machine is refused unless
        ``allowInsecureHttp`` (the token would travel in clear text)."""
        self._useBackend(("server", url, token, bool(allowInsecureHttp)),
                         lambda: ServerBackend(url, token, allow_insecure_http=allowInsecureHttp))

    def _useBackend(self, config, make) -> None:
        if self.backend is not None and config == self._backendConfig:
            return
        self.close()
        self.backend, self._backendConfig = make(), config

    def close(self) -> None:
        """Forget the backend and stop the worker, without blocking: the backend's session is closed
        (a server frees its files: an HTTP request) on the worker thread, after the run in progress
        (cancel it first, or it runs to its end), then the worker ends."""
        backend, executor = self.backend, self._executor
        self.backend, self._backendConfig, self._lastVolumeKey, self._executor = None, None, None, None
        if backend is not None:
            if executor is not None:
                executor.submit(self._closeBackend, backend)
            else:  # nothing ever ran: no session was opened, closing sends nothing
                self._closeBackend(backend)
        if executor is not None:
            executor.shutdown(wait=False)

    @staticmethod
    def _closeBackend(backend) -> None:
        try:
            backend.close()
        except Exception:  # noqa: BLE001 - closing must not fail a scene close
            logging.exception("MedSAM3D: closing the backend failed")

    @staticmethod
    def inScene(node) -> bool:
        """True when ``node`` is still in its scene (not removed, the scene not closed)."""
        scene = node.GetScene() if node is not None else None
        return bool(scene is not None and scene.IsNodePresent(node))

    def canRefine(self) -> bool:
        return self.backend is not None and self._lastVolumeKey is not None

    @staticmethod
    def segmentationsLogic():
        return slicer.modules.segmentations.logic()

    # ------------------------------------------------------------------ runs
    def _submit(self, work, volumeNode=None, segmentationNode=None, tableNode=None) -> Task:
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            # one persistent worker: torch's per-thread caches stay warm between runs
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="MedSAM3D")
        progress = Progress()
        return Task(self._executor.submit(work, progress), progress, volumeNode, segmentationNode, tableNode)

    @staticmethod
    def volumeKey(volumeNode):
        """Tells volumes apart (a new session when the node, its voxels or its geometry change)."""
        image = volumeNode.GetImageData()
        return (volumeNode.GetID(), image.GetMTime() if image else 0, tuple(bridge.ijk_to_ras(volumeNode).ravel()))

    def _openWork(self, volumeNode):
        """What the worker needs to open a session on this volume, prepared on the main thread."""
        key = self.volumeKey(volumeNode)
        if isinstance(self.backend, InProcessBackend):
            if self.backend.is_open(key):
                return lambda: None
            array, matrix, meta = bridge.volume_from_node(volumeNode)
            return lambda: self.backend.open(key, array, matrix, meta)
        if isinstance(self.backend, ServerBackend):
            if self.backend.is_open(key):
                return lambda: None
            if self._tempDir is None:
                self._tempDir = tempfile.TemporaryDirectory(prefix="MedSAM3D-")
            path = os.path.join(self._tempDir.name, "volume.nrrd")
            bridge.write_volume_file(volumeNode, path, compress=False)  # on the GUI thread: no gzip
            return lambda: self.backend.open(key, path)
        raise ValueError("expected a backend, found none; call useInProcess() or useServer() first")

    def startSegment(self, volumeNode, roiNodes, options=None, segmentationNode=None, tableNode=None) -> Task:
        """Segment the objects the ROIs outline (one object per ROI name) -> a running :class:`Task`
        that keeps ``volumeNode`` and the output nodes (see :class:`Task`)."""
        prompts = bridge.prompts_from_rois(roiNodes, volumeNode)
        logging.info(f"MedSAM3D prompts: {prompts}")
        options = dict(options or {})
        if isinstance(self.backend, ServerBackend) and not options.get("modality"):
            # in-process, the modality travels in the volume's meta; a server gets the file, without it
            modality = bridge.dicom_modality(volumeNode)
            if modality in MODALITIES:
                options["modality"] = modality
        open_session = self._openWork(volumeNode)
        backend = self.backend
        self._lastVolumeKey = None

        def work(progress):
            open_session()
            outcome = backend.segment(prompts, options, progress)
            if self.backend is backend:  # not closed meanwhile (scene closed, another backend chosen)
                self._lastVolumeKey = backend.key
            return outcome

        return self._submit(work, volumeNode, segmentationNode, tableNode)

    def startRefine(self, volumeNode, roiNode, sliceNode, objectName=None, segmentationNode=None,
                    tableNode=None) -> Task:
        """Add ``roiNode``'s box on the slice ``sliceNode`` shows to object ``objectName`` (the ROI's
        name by default) and segment again -> a running :class:`Task` (keeping the nodes, see
        :class:`Task`). Refuses a ROI that does not reach that slice."""
        if not self.canRefine() or self.volumeKey(volumeNode) != self._lastVolumeKey:
            raise ValueError("expected a segmentation of this volume to refine, found none; press Segment first")
        k, box = bridge.refine_box(roiNode, volumeNode, sliceNode)
        name = objectName or roiNode.GetName()
        logging.info(f"MedSAM3D refine: object {name!r}, slice {k}, box {box}")
        backend = self.backend
        return self._submit(lambda progress: backend.refine(name, k, box, progress), volumeNode, segmentationNode,
                            tableNode)

    def applyOutcome(self, outcome, volumeNode, segmentationNode, tableNode, showSurface=True) -> None:
        """Put a finished run into the scene: segments (names, colours), the measurement table, the surface.
        ``volumeNode`` is the volume the run segmented (``Task.volumeNode``)."""
        if not self.inScene(volumeNode):
            raise ValueError("expected the segmented volume in the scene, found it removed while the run went on; "
                             "the result is dropped")
        if outcome.labels is not None:
            array, matrix, segments = outcome.labels
            bridge.labels_to_segmentation(array, matrix, segments, segmentationNode, self.segmentationsLogic(),
                                          volumeNode)
        else:
            path = os.path.join(tempfile.mkdtemp(prefix="MedSAM3D-"), "labels.seg.nrrd")
            try:
                with open(path, "wb") as out:
                    out.write(outcome.labels_seg_nrrd)
                bridge.read_segmentation_file(path, segmentationNode, volumeNode)
            finally:
                os.unlink(path)
                os.rmdir(os.path.dirname(path))
        bridge.fill_measurements_table(tableNode, outcome.record)
        bridge.show_surface(segmentationNode, showSurface)

    def process(self, volumeNode, roiNodes, segmentationNode, tableNode, *, mode="In-process", model="litemedsam",
                device="auto", checkpoint=None, serverUrl=None, token=None, allowInsecureHttp=False, fast=False,
                showSurface=True, timeout=None):
        """Segment and put the result into the scene, blocking (scripts, the self-test). Returns the record."""
        if mode == "Server":
            self.useServer(serverUrl, token, allowInsecureHttp=allowInsecureHttp)
        else:
            self.useInProcess(model, device, checkpoint)
        task = self.startSegment(volumeNode, roiNodes, options={"fast": fast or None},
                                 segmentationNode=segmentationNode, tableNode=tableNode)
        waited = 0.0
        while not task.done():  # keep the GUI alive while the worker runs
            slicer.app.processEvents()
            qt.QThread.msleep(50)
            waited += 0.05
            if timeout is not None and waited > timeout:
                task.cancel()
        outcome = task.result()
        self.applyOutcome(outcome, task.volumeNode, task.segmentationNode, task.tableNode, showSurface=showSurface)
        return outcome.record


#
# MedSAM3DTest
#
class MedSAM3DTest(ScriptedLoadableModuleTest):
    """Offline self-test on a synthetic phantom (a bright ellipsoid in noise, no download).

    ``test_MedSAM3DBridge`` runs in any Slicer; ``test_MedSAM3DInProcess`` needs medsam3d in
    Slicer's Python (skipped otherwise; the installation is never triggered by a test);
    ``test_MedSAM3DServer`` needs ``MEDSAM3D_TEST_SERVER_URL`` (and ``MEDSAM3D_TOKEN`` when the
    server has one). Run: ``Slicer --no-splash --testing --python-code "slicer.selfTests['MedSAM3D']()"``.
    """

    TOLERANCE = 0.15  # the segmented volume within 15 % of the ellipsoid's

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_MedSAM3DBridge, self.test_MedSAM3DInProcess, self.test_MedSAM3DServer):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"{test.__name__} skipped: {reason}")

    def _phantom(self):
        from MedSAM3DLib.phantom import phantom

        array, matrix, centre, size, analytic_ml = phantom()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedSAM3D phantom")
        bridge.update_volume_node(volume, array, matrix)
        volume.CreateDefaultDisplayNodes()
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ellipsoid")
        roi.SetCenter(*centre)
        roi.SetSize(*size)
        return volume, roi, array, matrix, analytic_ml

    def _outputs(self):
        return (slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"),
                slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode"))

    def _checkResult(self, segmentation, table, record, analytic_ml, voxel_ml):
        self.assertEqual([o["name"] for o in record["objects"]], ["ellipsoid"])
        volume_ml = record["objects"][0]["volume_ml"]
        self.assertLess(abs(volume_ml - analytic_ml) / analytic_ml, self.TOLERANCE,
                        f"{volume_ml:.2f} mL segmented, {analytic_ml:.2f} mL in the phantom")
        labels, _, segments = bridge.segmentation_to_labels(segmentation, slicer.modules.segmentations.logic(),
                                                            slicer.util.getNode("MedSAM3D phantom"))
        self.assertEqual([s["name"] for s in segments.values()], ["ellipsoid"])
        self.assertAlmostEqual((labels > 0).sum() * voxel_ml, volume_ml, places=3)
        rows = bridge.table_rows(table)
        self.assertEqual(rows[0]["Object"], "ellipsoid")
        self.assertAlmostEqual(rows[0]["Volume (mL)"], volume_ml, places=6)
        self.assertTrue(segmentation.GetSegmentation().ContainsRepresentation("Closed surface"))

    def test_MedSAM3DBridge(self):
        """Nodes <-> medsam3d's data on the phantom, without medsam3d: the ROI's prompt, the analytic
        ellipsoid's label map as a named segment, a record as the measurement table."""
        import numpy as np

        self.delayDisplay("MedSAM3D: bridge on the phantom")
        volume, roi, array, matrix, analytic_ml = self._phantom()
        again, matrix2, _ = bridge.volume_from_node(volume)
        self.assertTrue(np.array_equal(again, array))
        self.assertTrue(np.allclose(matrix2, matrix))
        prompts = bridge.prompts_from_rois([roi], volume)
        self.assertEqual(prompts["objects"][0]["name"], "ellipsoid")
        self.assertIn("box_ras", prompts["objects"][0])
        mask = (array > 250).astype(np.uint8)
        segmentation, table = self._outputs()
        bridge.labels_to_segmentation(mask, matrix, {1: {"name": "ellipsoid", "color": (0.9, 0.6, 0.2)}},
                                      segmentation, slicer.modules.segmentations.logic(), volume)
        voxel_ml = abs(np.linalg.det(matrix[:3, :3])) / 1000.0
        record = {"objects": [{"name": "ellipsoid", "label": 1, "volume_ml": float(mask.sum() * voxel_ml),
                               "volume_ml_range": None, "voxels": int(mask.sum()), "flags": [], "measurements": None}]}
        bridge.fill_measurements_table(table, record)
        bridge.show_surface(segmentation)
        self._checkResult(segmentation, table, record, analytic_ml, voxel_ml)
        self.delayDisplay("bridge test passed")

    def test_MedSAM3DInProcess(self):
        """The phantom segmented in-process from its ROI: volume within 15 % of the ellipsoid's."""
        from MedSAM3DLib import install

        if not install.medsam3d_available():
            self.skipTest("medsam3d is not installed in Slicer's Python")
        self._runPhantom(mode="In-process", device=os.environ.get("MEDSAM3D_TEST_DEVICE", "auto"))

    def test_MedSAM3DServer(self):
        """The phantom segmented by the server at MEDSAM3D_TEST_SERVER_URL."""
        url = os.environ.get("MEDSAM3D_TEST_SERVER_URL")
        if not url:
            self.skipTest("MEDSAM3D_TEST_SERVER_URL is not set")
        self._runPhantom(mode="Server", serverUrl=url, token=os.environ.get("MEDSAM3D_TOKEN"))

    def _runPhantom(self, **kwargs):
        import numpy as np

        self.delayDisplay(f"MedSAM3D: segmenting the phantom ({kwargs['mode']})")
        volume, roi, array, matrix, analytic_ml = self._phantom()
        segmentation, table = self._outputs()
        logic = MedSAM3DLogic()
        try:
            record = logic.process(volume, [roi], segmentation, table, **kwargs)
        finally:
            logic.close()
        self._checkResult(segmentation, table, record, analytic_ml, abs(np.linalg.det(matrix[:3, :3])) / 1000.0)
        self.delayDisplay(f"{kwargs['mode']} test passed: {record['objects'][0]['volume_ml']:.2f} mL "
                          f"(phantom {analytic_ml:.2f} mL)")
