"""Intel RealSense cameras (pyrealsense2): live by serial, or an SDK recording (.db3) through the same pipeline."""
