"""What is stored: the object format, object names, the original tool's format, and the
selection of each key's objects from a listing. Pure functions over bytes and names."""
