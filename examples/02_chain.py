"""The seed's second example: chain two tasks; the first result feeds the second."""

from tasks import add

if __name__ == "__main__":
    result = (add.s(4, 4) | add.s(8)).delay()  # add(4, 4), then add(8, 8)
    print(f"Task state: {result.state}")
    print(f"Result: {result.get(timeout=30)}")
    print(f"Task state: {result.state}")
    print(f"First link: {result.parent.get(timeout=30)}")
