"""Where inputs come from: files now; cameras, streams and microphones register here too."""
