"""The seed's first example: call a task with delay() and wait for its result."""

from tasks import add

if __name__ == "__main__":
    result = add.delay(4, 4)
    print(f"Task state: {result.state}")
    print(f"Result: {result.get(timeout=30)}")
    print(f"Task state: {result.state}")
