import AsyncHTTPClient
import ChatBridgeSimulators
import Foundation
import Testing

/// How `chatbridge` sizes its threads to the CPUs it may use (`ChatBridgeCommand.main`).
@Suite(.serialized) struct ExecutorTests {
    /// The names of the process's threads (Linux).
    func threadNames(of pid: Int32) -> [String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.compactMap { try? String(contentsOfFile: "/proc/\(pid)/task/\($0)/comm", encoding: .utf8) }
            .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
    }

    @Test func onOneUsableCPUTheServerRunsOneEventLoopAndAnswersOnIt() async throws {
        let taskset = "/usr/bin/taskset"
        try #require(FileManager.default.isExecutableFile(atPath: taskset), "needs taskset (util-linux)")
        // One of the CPUs this test may use itself.
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let allowed = try #require(status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") })
        let cpu = String(allowed.dropFirst("Cpus_allowed_list:".count).trimmingCharacters(in: .whitespaces).prefix { $0.isNumber })
        let run = try await CrashRun.start(launcher: [taskset, "-c", cpu])
        let (server, dingtalk, sender) = (run.first, run.dingtalk, run.sender)
        let log = try String(contentsOfFile: run.directory + "/first.log", encoding: .utf8)
        #expect(log.contains("event_loops=1 ") && log.contains("executor=event-loops "))
        // One event loop for one CPU (NIO alone would start one per CPU of the machine), and the store's two
        // threads under names of their own.
        let names = threadNames(of: server.process.processIdentifier)
        #expect(names.filter { $0.hasPrefix("NIO-SGLTN-") }.count == 1, "\(names)")
        #expect(names.contains("cb-sqlite"))
        // Swift concurrency's jobs run on that loop: a message is still accepted and answered once.
        let body = sender.body(messageID: "one-cpu", text: "hello", conversationID: "cid==", senderStaffID: "u1", webhook: dingtalk.webhookURL(session: "one-cpu"))
        #expect(try await sender.post(body, client: run.client).status == 200)
        #expect(await eventually(seconds: 30) { dingtalk.deliveries.count == 1 })
        server.signal(SIGTERM)
        #expect(await server.wait() == 0)
        #expect(dingtalk.deliveries.count == 1)
        await run.stop()
    }
}
