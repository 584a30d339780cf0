"""From checkpoint to candidate .tflite: the export's thread and child process, the converter, verification, gates."""
